"""Client schema patterns: which ones skip the match timer, and that the timer stops the rest."""

from __future__ import annotations

import time

import pytest

from sidecar.safe_regex import PatternTooSlow, linear, search


@pytest.mark.parametrize(
    ("pattern", "untimed"),
    [
        (r"^INV-[0-9]{6}$", True),
        (r"^[a-z]+$", True),
        (r"^\d{2,4}$", True),
        (r"^[\]x]+$", True),  # a ] inside the class is not its end
        (r"^[(|)]+$", True),  # nor are ( | ) inside a class a group or an alternation
        (r"^(a|aa)+$", False),
        (r"^\S+@\S+$", False),  # two variable quantifiers: polynomial backtracking
        (r"(\w)\1", False),
        (r"x{2,}y+", False),
        (r"a{,3}", False),
    ],
)
def test_only_patterns_without_backtracking_skip_the_timer(pattern: str, untimed: bool) -> None:
    assert linear(pattern) is untimed


def test_a_catastrophic_match_is_stopped() -> None:
    started = time.monotonic()
    with pytest.raises(PatternTooSlow):
        search(r"^(a|aa)+$", "a" * 60 + "!")
    assert time.monotonic() - started < 1


def test_long_texts_are_timed_even_for_simple_patterns() -> None:
    assert search(r"^[a-z]+$", "a" * 5000)
    assert not search(r"^[a-z]+$", "a" * 5000 + "!")
