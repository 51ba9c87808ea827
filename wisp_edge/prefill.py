"""The drafter's prompt prefill, run in a background thread while the verifier decodes.

A slow board prefills a long prompt at tens of tokens per second (a Raspberry Pi 5 needs seconds for
a few hundred tokens). Waiting for it stalls the answer; instead the engine sends empty drafts and the
verifier answers each with one target token (plain cloud decoding) until the drafter has caught up.
llama.cpp and onnxruntime release the GIL while they compute, so the rounds really overlap it.
"""

from __future__ import annotations

import threading
import time

from wisp_edge.drafters.base import Drafter


class BackgroundPrefill:
    """Reset the drafter to the committed tokens and evaluate them in a thread; nothing else may touch the
    drafter until it has caught up (`ready` or `catch_up`)."""

    def __init__(self, drafter: Drafter, committed: list[int], wait_s: float | None) -> None:
        """Waits up to `wait_s` (None: until done) and catches up at once on a prefill that ended by then."""
        self.drafter = drafter
        self.error: BaseException | None = None
        self.elapsed_ms = 0.0
        self.caught_up = False
        drafter.reset(committed)
        self._thread = threading.Thread(target=self._run, name="wisp-drafter-prefill", daemon=True)
        self._thread.start()
        self._thread.join(wait_s)
        if not self._thread.is_alive():
            self.catch_up(committed)

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            self.drafter.logits()
        except BaseException as e:  # re-raised in the caller's thread by catch_up()
            self.error = e
        self.elapsed_ms = (time.perf_counter() - t0) * 1000

    def ready(self, committed: list[int]) -> bool:
        """Whether the drafter may draft: once its prefill has ended it catches up on `committed`."""
        if not self.caught_up and not self._thread.is_alive():
            self.catch_up(committed)
        return self.caught_up

    def catch_up(self, committed: list[int]) -> None:
        """Finish the prefill (raising what the drafter raised), then hand the drafter the tokens the
        verifier decoded meanwhile."""
        if self.caught_up:
            return
        self._thread.join()
        if self.error is not None:
            raise self.error
        for token in committed[len(self.drafter.tokens):]:
            self.drafter.append(token)
        self.caught_up = True

    def close(self) -> float:
        """Wait for the thread (the drafter is free only then, even if the answer ended first); its time in ms."""
        self._thread.join()
        return self.elapsed_ms
