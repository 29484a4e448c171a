"""Answer extraction and normalisation for the generated task families.

Every solution trace ends with one line `#### <answer>`. A completion is scored on the text after
the *first* marker, up to the end of that line: whatever the model writes after its answer line
(for example when it does not stop at end-of-sequence) is ignored, and a later marker cannot
overwrite an earlier answer, so hedging with several answers gains nothing.

Normalisation is strict on purpose: it forgives spacing, a leading `+` and leading zeros, but not
extra words, so the reward cannot be earned by text that merely contains the right number.
"""

from __future__ import annotations

import re

ANSWER_MARKER = "####"

_INTEGER = re.compile(r"[+-]?[0-9]+")
_LIST_SEPARATORS = re.compile(r"[\s,]+")


def extract_answer(completion: str, marker: str = ANSWER_MARKER) -> str | None:
    """The stripped text after the first `marker`, to the end of its line; None if absent or empty.

    >>> extract_answer("3+4=7\\n#### 7\\n")
    '7'
    """
    at = completion.find(marker)
    if at < 0:
        return None
    rest = completion[at + len(marker):]
    answer = rest.split("\n", 1)[0].strip()
    return answer or None


def normalize_integer(text: str | None) -> str | None:
    """Canonical decimal form of one integer ("+007" -> "7", "-0" -> "0"); None if not an integer.

    Surrounding whitespace is dropped; anything else around the number (words, a decimal point,
    a second number) makes it not an integer.
    """
    if text is None:
        return None
    text = text.strip()
    if not _INTEGER.fullmatch(text):
        return None
    return str(int(text))


def normalize_integer_list(text: str | None) -> str | None:
    """Canonical form of a list of integers: single spaces between canonical integers.

    Accepts spaces and/or commas as separators and one optional pair of surrounding brackets,
    so "[1, 02,3]" -> "1 2 3". None if empty or if any item is not an integer.
    """
    if text is None:
        return None
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    items = [item for item in _LIST_SEPARATORS.split(text) if item]
    if not items:
        return None
    normalized = [normalize_integer(item) for item in items]
    if any(item is None for item in normalized):
        return None
    return " ".join(normalized)  # type: ignore[arg-type]
