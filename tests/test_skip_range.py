"""SkipRange: the paper's 1-based inclusive ranges, parsing and validation messages."""
import pytest

from onex_export.config import SkipRange
from onex_export.errors import SkipRangeError, UsageError


def test_paper_range_maps_to_diffusers_indices():
    r = SkipRange.parse("3-10")
    assert (r.first, r.last, r.count) == (3, 10, 8)
    assert (r.start0, r.stop0) == (2, 10)
    assert r.indices0 == (2, 3, 4, 5, 6, 7, 8, 9)
    assert str(r) == "3-10"


def test_single_block_and_whitespace():
    assert SkipRange.parse(" 5 ") == SkipRange(5, 5)
    assert SkipRange.parse("3 - 8") == SkipRange(3, 8)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty skip range"),
        ("   ", "empty skip range"),
        ("abc", "malformed skip range 'abc'"),
        ("3-", "malformed skip range '3-'"),
        ("3-10-12", "malformed skip range"),
        ("-3-5", "malformed skip range"),
        ("10-3", "is reversed"),
        ("0-4", "starts below 1"),
    ],
)
def test_bad_text_gives_its_message(text, message):
    with pytest.raises(SkipRangeError, match=message) as info:
        SkipRange.parse(text)
    assert info.value.hint  # every message says what to do
    assert isinstance(info.value, UsageError)


def test_reversed_hint_suggests_the_fix():
    with pytest.raises(SkipRangeError) as info:
        SkipRange.parse("10-3")
    assert "3-10" in info.value.hint


def test_non_integer_bounds_rejected():
    with pytest.raises(SkipRangeError, match="must be an integer"):
        SkipRange(3.0, 10)


def test_range_touching_last_block_names_block_count_and_valid_range():
    with pytest.raises(SkipRangeError) as info:
        SkipRange(3, 24).validate_for(24)
    text = str(info.value)
    assert "24 transformer blocks" in text and "1-23" in text and "context_pre_only" in text


def test_range_out_of_model_names_block_count():
    with pytest.raises(SkipRangeError) as info:
        SkipRange(3, 30).validate_for(24)
    assert "only 24 blocks" in str(info.value) and "1-23" in str(info.value)


def test_valid_ranges_pass():
    assert SkipRange(3, 23).validate_for(24) == SkipRange(3, 23)
    assert SkipRange(1, 37).validate_for(38).count == 37


def test_model_without_skippable_block():
    with pytest.raises(SkipRangeError, match="no skippable block"):
        SkipRange(1, 1).validate_for(1)
