"""Table tests for answer extraction and normalisation (mtprl.tasks.answers)."""

import pytest

from mtprl.tasks.answers import extract_answer, normalize_integer, normalize_integer_list


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("#### 42", "42"),
        ("3+4=7\n#### 7", "7"),
        ("work\n####   42   \n", "42"),  # spaces around the answer are dropped
        ("####42", "42"),  # no space after the marker
        ("#### -17\n", "-17"),
        ("#### 1 2 3\n", "1 2 3"),  # the rest of the line, internal spaces kept
        ("no marker here\n42", None),  # missing marker
        ("", None),
        ("####\n", None),  # marker with nothing after it
        ("####   \n5", None),  # the answer must be on the marker's line
        ("#### 1\n#### 2", "1"),  # several markers: the first one counts
        ("x #### 3 #### 4", "3 #### 4"),  # later markers on the same line are text
        ("#### 5\nQ: 1+1=?\n", "5"),  # text after the answer line is ignored
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("42", "42"),
        ("  42 ", "42"),
        ("007", "7"),  # leading zeros
        ("000", "0"),
        ("-0", "0"),  # negative zero is zero
        ("-007", "-7"),
        ("+5", "5"),
        ("-12", "-12"),
        ("- 12", None),  # no space between sign and digits
        ("1 2", None),  # two numbers are not one integer
        ("4.0", None),
        ("1,000", None),
        ("12a", None),
        ("", None),
        (None, None),
        ("\u0664\u0662", None),  # Arabic-Indic digits are not accepted, only ASCII 0-9
    ],
)
def test_normalize_integer(text, expected):
    assert normalize_integer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1 2 3", "1 2 3"),
        ("  1   2 3 ", "1 2 3"),
        ("1,2,3", "1 2 3"),
        ("[1, 02, 3]", "1 2 3"),  # brackets, commas and leading zeros
        ("-1 0 +4", "-1 0 4"),
        ("5", "5"),
        ("", None),
        ("[]", None),
        ("1 2 x", None),
        ("1 2.5", None),
        (None, None),
    ],
)
def test_normalize_integer_list(text, expected):
    assert normalize_integer_list(text) == expected
