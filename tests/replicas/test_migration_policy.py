"""The load-balancing migration policy on fake replica loads (no Ray, no engines): the least free replica gives
one request to the freest when their freeness differs by more than the threshold and the move narrows the gap
without reversing it; the cheapest request moves."""

import pytest

from strata.errors import ConfigError
from strata.replicas.live_migration import MigrationConfig
from strata.replicas.migration_policy import Candidate, freeness, plan_migration


def _load(free: int, running: int, waiting: int = 0) -> dict:
    return {"num_free_blocks": free, "num_running": running, "num_waiting": waiting}


def test_freeness_is_free_blocks_per_request_held():
    assert freeness(100, 4) == 25.0 and freeness(100, 0) == 100.0


def test_the_busiest_replica_gives_its_smallest_request_to_the_freest():
    loads = {0: _load(80, 2), 1: _load(100, 0)}  # freeness 40 against 100
    cands = [Candidate("a", 0, 12), Candidate("b", 0, 8)]
    assert plan_migration(loads, cands, threshold=8.0) == ("b", 0, 1)


def test_queued_requests_count_as_load():
    loads = {0: _load(90, 1, waiting=5), 1: _load(100, 2)}  # freeness 15 against 50
    assert plan_migration(loads, [Candidate("a", 0, 5), Candidate("c", 1, 20)], threshold=5.0) == ("a", 0, 1)
    assert plan_migration(loads, [Candidate("a", 0, 5)], threshold=40.0) is None  # a gap of 35 is below


def test_a_move_that_would_reverse_the_imbalance_is_not_made():
    # two requests against one: moving one leaves the target the busier (ping-pong), so nothing moves
    loads = {0: _load(80, 2), 1: _load(90, 1)}  # freeness 40 against 90
    assert plan_migration(loads, [Candidate("a", 0, 10)], threshold=8.0) is None
    # one request alone on a replica is not moved to an idle one: the gap would stay the same
    assert plan_migration({0: _load(90, 1), 1: _load(100, 0)}, [Candidate("a", 0, 10)], threshold=1.0) is None


def test_nothing_to_move_or_nowhere_to_go():
    assert plan_migration({0: _load(10, 3)}, [Candidate("a", 0, 3)], threshold=0.0) is None
    assert plan_migration({0: _load(10, 3), 1: _load(100, 0)}, [], threshold=0.0) is None


def test_the_source_is_the_least_free_replica_with_a_request_that_may_move():
    loads = {0: _load(10, 5), 1: _load(50, 5), 2: _load(100, 0)}  # freeness 2, 10, 100
    assert plan_migration(loads, [Candidate("x", 1, 2)], threshold=8.0) == ("x", 1, 2)  # replica 0's cannot move
    assert plan_migration(loads, [Candidate("x", 1, 2), Candidate("y", 0, 2)], threshold=8.0) == ("y", 0, 2)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("migration_max_stages", 0, "--migration-max-stages must be >= 1, got 0"),
    ("migration_last_stage_max_blocks", -1, "--migration-last-stage-max-blocks must be >= 0, got -1"),
    ("migration_interval", 0.0, "--migration-interval must be > 0 seconds, got 0.0"),
])
def test_bad_migration_settings_are_one_line(field, value, message):
    with pytest.raises(ConfigError, match=message):
        MigrationConfig(**{field: value}).check()
