"""When a fused container tries again to prepare the native plan it replays (LayoutSequential's replay
of its members, a fused classifier's whole-model call).

Preparing walks every member, so it must not happen on every call when it keeps failing, or when
a plan goes stale soon after it is made (something changes every call: parameters updated between
calls, hooks, a mode). After such a try the container runs the slow way FIRST_RETRY_INTERVAL
calls before the next one, doubling that up to MAX_RETRY_INTERVAL; a plan that served at least
MIN_USEFUL_REPLAYS calls before it went stale paid for itself, and the next try comes right after
the next slow call.
"""
from __future__ import annotations

FIRST_RETRY_INTERVAL = 4
MAX_RETRY_INTERVAL = 1024
MIN_USEFUL_REPLAYS = 8


class RetrySchedule:
    """One plan's schedule of preparation tries; see the module docstring."""

    __slots__ = ("_replays", "_countdown", "_interval")

    def __init__(self) -> None:
        self._replays = 0
        self._countdown, self._interval = 1, FIRST_RETRY_INTERVAL

    def try_due(self) -> bool:
        """Counts a call that ran the slow way; True when the next try to prepare is due now."""
        self._countdown -= 1
        return self._countdown <= 0

    def prepared(self) -> None:
        """The try made a plan."""
        self._replays, self._countdown = 0, 1

    def failed(self) -> None:
        """The try made no plan: wait longer before the next."""
        self._back_off()

    def not_yet(self) -> None:
        """Nothing to try yet (a member prepares what the plan needs on its next call): try again
        after the next call, without waiting longer."""
        self._countdown = 1

    def replayed(self) -> None:
        """The plan served a call."""
        self._replays += 1

    def went_stale(self) -> None:
        """The plan no longer matches and is dropped."""
        if self._replays < MIN_USEFUL_REPLAYS:
            self._back_off()
        else:
            self._interval = FIRST_RETRY_INTERVAL

    def _back_off(self) -> None:
        self._countdown, self._interval = self._interval, min(2 * self._interval, MAX_RETRY_INTERVAL)
