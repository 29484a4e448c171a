"""The regime registry is the one seam: no code outside it (and `apply_regime`) branches on a regime's name.

A grep over the package's source for comparisons of anything with a registered regime's name as a
string literal (`== "occ"`, `!= 'frozen'`, `in ("occ", ...)`, `case "ce"`). Regime properties must
be read from the record (`mtprl.losses.get_regime(name).needs_exact_slopes`, ...).
"""

import re
from pathlib import Path

from mtprl.losses import MTP_REGIMES

PACKAGE = Path(__file__).resolve().parents[1] / "mtprl"
SEAM = {PACKAGE / "losses" / "regimes.py", PACKAGE / "model" / "regime.py"}


def comparisons(text: str, names: list[str]) -> list[str]:
    """Lines of `text` that compare something with one of `names` written as a string literal."""
    literal = "|".join(re.escape(n) for n in names)
    quoted = rf"""(?:"(?:{literal})"|'(?:{literal})')"""
    patterns = [
        rf"(?:==|!=)\s*{quoted}",  # x == "occ"
        rf"{quoted}\s*(?:==|!=)",  # "occ" == x
        rf"\bin\s*[\(\[\{{][^\)\]\}}]*{quoted}",  # x in ("frozen", "occ-exact")
        rf"\bcase\s+{quoted}",  # match / case "ce"
    ]
    found = re.compile("|".join(patterns))
    return [line.strip() for line in text.splitlines() if found.search(line)]


def test_the_grep_finds_what_it_should():
    names = list(MTP_REGIMES)
    caught = ['if regime == "detach":', "on = cfg.regime != 'frozen'", 'if r in ("frozen", "occ-exact"):',
              '    case "ce":', 'if "occ" == regime:']
    fine = ['REGIMES = ["frozen", "detach"]', 'LOSS_NAMES = {"occ": "occ"}', 'if loss_type == "dapo":',
            'get_regime("occ")', 'if kind == "policy-gradient":']
    assert comparisons("\n".join(caught), names) == [c.strip() for c in caught]
    assert comparisons("\n".join(fine), names) == []


def test_no_code_outside_the_registry_compares_a_regime_name():
    names = list(MTP_REGIMES)
    offending = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path in SEAM:
            continue
        lines = comparisons(path.read_text(), names)
        if lines:
            offending[str(path.relative_to(PACKAGE.parent))] = lines
    assert not offending, f"regime names compared outside mtprl/losses/regimes.py: {offending}"
