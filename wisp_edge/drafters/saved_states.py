"""Saved drafter caches of a few conversations besides the live one, so that clients taking turns on one
drafter (`wisp-edge serve`) each prefill only their new message.

A drafter keeps the cache of one sequence. When a reset would throw most of it away (another
conversation arrived), the drafter first saves it here, keyed by its tokens; a later reset that shares
a longer prefix with a saved cache than with the live one loads that cache instead. The least recently
saved goes first; capacity 0 saves nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from wisp_edge.drafters.base import common_prefix_len

# A chat's next turn drops only the last few tokens of its cache (the drafts past its answer): no copy then.
SAVE_MIN_TOKENS = 16


@dataclass
class Saved:
    tokens: list[int]  # what the saved cache holds
    state: object  # the backend's copy of it


class SavedStates:
    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, int(capacity))
        self.entries: list[Saved] = []  # least recently saved first

    def switch(self, evaluated: list[int], tokens: list[int], live_keep: int,
               reusable: Callable[[list[int], list[int]], int], snapshot: Callable[[], object | None]) -> Saved | None:
        """Before a reset from the live cache (`evaluated`, of which it keeps `live_keep`) to `tokens`: the
        saved cache to load instead, taken out of the store, when it keeps more; the live cache is saved
        first when the reset would drop at least SAVE_MIN_TOKENS of it."""
        if not self.capacity:
            return None
        best = max(self.entries, key=lambda e: reusable(e.tokens, tokens), default=None)
        if best is not None and reusable(best.tokens, tokens) <= live_keep:
            best = None
        if best is not None:
            self.entries.remove(best)
        if len(evaluated) - (0 if best else live_keep) >= SAVE_MIN_TOKENS:
            self._save(list(evaluated), snapshot)
        return best

    def _save(self, tokens: list[int], snapshot: Callable[[], object | None]) -> None:
        state = snapshot()
        if state is None:  # the backend could not copy its cache
            return
        # an earlier turn of this conversation (all but its last few tokens shared) is superseded by it
        self.entries = [e for e in self.entries
                        if common_prefix_len(e.tokens, tokens) < len(e.tokens) - SAVE_MIN_TOKENS]
        self.entries.append(Saved(tokens, state))
        del self.entries[:-self.capacity]
