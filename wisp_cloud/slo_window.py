"""The share of recent SLO jobs that finished by their deadline, defined once.

Admission refuses newcomers while most recent rounds miss their SLO (adding sessions would only make
it worse), and /health reports the same figure; the simulator keeps one too. Times are the caller's
monotonic clock (seconds), so the window is pure; outcomes that fall out of it are dropped as time
passes, so asking costs O(1) however often admission asks.
"""

from __future__ import annotations

from collections import deque

ATTAINMENT_WINDOW_S = 10.0
OUTCOMES_KEPT = 1024  # at most this many of the latest outcomes count


class SloWindow:
    def __init__(self, window_s: float = ATTAINMENT_WINDOW_S, kept: int = OUTCOMES_KEPT) -> None:
        self.window_s, self.kept = window_s, kept
        self._outcomes: deque[tuple[float, bool]] = deque()  # (finish time, met), oldest first
        self._met = 0

    def record(self, done: float, met: bool) -> None:
        if len(self._outcomes) == self.kept:
            self._drop_oldest()
        self._outcomes.append((done, met))
        self._met += met

    def attainment(self, now: float) -> tuple[float, int]:
        """Share of SLO jobs finished by their deadline in the last `window_s` (1.0 when none), and their count."""
        horizon = now - self.window_s
        while self._outcomes and self._outcomes[0][0] < horizon:
            self._drop_oldest()
        count = len(self._outcomes)
        return (self._met / count if count else 1.0), count

    def _drop_oldest(self) -> None:
        self._met -= self._outcomes.popleft()[1]
