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
    """Evaluate the drafter's whole current sequence in a thread; nothing else may touch the drafter
    until `join()` returns."""

    def __init__(self, drafter: Drafter) -> None:
        self.drafter = drafter
        self.error: BaseException | None = None
        self.elapsed_ms = 0.0
        self._thread = threading.Thread(target=self._run, name="wisp-drafter-prefill", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            self.drafter.logits()
        except BaseException as e:  # re-raised in the caller's thread by join()
            self.error = e
        self.elapsed_ms = (time.perf_counter() - t0) * 1000

    def running(self) -> bool:
        return self._thread.is_alive()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block up to `timeout_s` (None: until done); True when the prefill has finished."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def join(self) -> float:
        """Wait for the prefill; its time in ms. Raises what the drafter raised."""
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.elapsed_ms
