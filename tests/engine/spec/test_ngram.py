"""Prompt lookup (engine/spec/ngram.py): which tokens it proposes."""

from strata.engine.spec.ngram import lookup


def test_proposes_what_followed_the_latest_match_of_the_longest_suffix():
    tokens = [1, 2, 3, 4, 9, 2, 3, 5, 6, 7, 8, 1, 2, 3]
    assert lookup(tokens, 3, 1, 3) == [4, 9, 2]  # [1, 2, 3] at 0 beats the later [2, 3] at 5
    assert lookup(tokens, 3, 1, 2) == [5, 6, 7]  # n = 2: the latest [2, 3] is at 5
    assert lookup([1, 2, 3], 3, 1, 3) == []  # no earlier occurrence


def test_a_match_near_the_end_repeats_its_period():
    """Fewer than k tokens follow the match: the copy runs on into its own proposal (a cycle of period p)."""
    assert lookup([7, 7, 7, 7], 4, 1, 2) == [7, 7, 7, 7]  # period 1
    assert lookup([5, 1, 2, 1, 2], 5, 1, 2) == [1, 2, 1, 2, 1]  # period 2
    assert lookup([5, 1, 2, 3, 1, 2, 3], 2, 1, 3) == [1, 2]  # enough tokens follow: cut at k
