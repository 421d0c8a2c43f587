"""The schedule on which fused containers prepare their native plans again (nn/retry_schedule.py)."""
from __future__ import annotations

from lwkernels.nn.retry_schedule import FIRST_RETRY_INTERVAL, MAX_RETRY_INTERVAL, MIN_USEFUL_REPLAYS, RetrySchedule


def _calls_until_due(schedule: RetrySchedule, limit: int = 10_000) -> int:
    """Slow calls counted until a try is due (that call included)."""
    for n in range(1, limit + 1):
        if schedule.try_due():
            return n
    raise AssertionError("no try became due")


def test_first_try_after_the_first_call():
    assert _calls_until_due(RetrySchedule()) == 1


def test_failed_tries_wait_twice_as_long_each_time_up_to_the_cap():
    s = RetrySchedule()
    _calls_until_due(s)
    waits = []
    for _ in range(12):
        s.failed()
        waits.append(_calls_until_due(s))
    expected = [min(FIRST_RETRY_INTERVAL * 2 ** i, MAX_RETRY_INTERVAL) for i in range(12)]
    assert waits == expected
    assert waits[-1] == MAX_RETRY_INTERVAL


def test_not_yet_retries_on_the_next_call_without_waiting_longer():
    s = RetrySchedule()
    _calls_until_due(s)
    s.failed()
    assert _calls_until_due(s) == FIRST_RETRY_INTERVAL
    s.not_yet()
    assert _calls_until_due(s) == 1
    s.failed()  # the interval was not doubled by not_yet()
    assert _calls_until_due(s) == 2 * FIRST_RETRY_INTERVAL


def test_a_plan_that_went_stale_quickly_backs_off():
    s = RetrySchedule()
    _calls_until_due(s)
    s.prepared()
    for _ in range(MIN_USEFUL_REPLAYS - 1):
        s.replayed()
    s.went_stale()
    assert _calls_until_due(s) == FIRST_RETRY_INTERVAL
    s.prepared()
    s.went_stale()
    assert _calls_until_due(s) == 2 * FIRST_RETRY_INTERVAL


def test_a_plan_that_paid_for_itself_is_prepared_again_at_once_and_resets_the_wait():
    s = RetrySchedule()
    _calls_until_due(s)
    for _ in range(3):  # build up a long wait
        s.failed()
        _calls_until_due(s)
    s.prepared()
    for _ in range(MIN_USEFUL_REPLAYS):
        s.replayed()
    s.went_stale()
    assert _calls_until_due(s) == 1
    s.failed()
    assert _calls_until_due(s) == FIRST_RETRY_INTERVAL
