"""A loopback TCP proxy that breaks the network on command, for tests of the edge's recovery.

It sits between a client and a server on 127.0.0.1 and forwards bytes both ways, and can be told to:
- `delay(s)`: hold every chunk s seconds before passing it on (a slow link);
- `stall()` ... `release()`: hold every byte, keeping connections open (a link that went dead);
- `cut_requests(n)`: close the next n connections as their request arrives (the server never sees it);
- `cut_replies(n)`: close the next n connections as the reply arrives (the server did the work, the
  client never hears of it: the case that idempotent round ids exist for);
- `refuse(True)`: close new connections at once.
It runs its own event loop on a thread, so a synchronous test drives it directly; `counts` says what
it did. No root, no network namespaces: bounded and loopback only, as CI needs.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

CHUNK = 1 << 16


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.counts: Counter[str] = Counter()
        self._delay_s = 0.0
        self._cut = {"request": 0, "reply": 0}
        self._refuse = False
        self._loop = asyncio.new_event_loop()
        self._flowing: asyncio.Event | None = None  # cleared while stalled
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- control (from any thread) ---------------------------------------------------------------

    def start(self) -> "FaultProxy":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def delay(self, seconds: float) -> None:
        self._delay_s = seconds

    def stall(self) -> None:
        self.counts["stalls"] += 1
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def release(self) -> None:
        """Back to a clean link: no stall, no delay, no pending cuts, connections accepted."""
        self._delay_s, self._refuse = 0.0, False
        self._cut = {"request": 0, "reply": 0}
        self._loop.call_soon_threadsafe(self._flowing.set)

    def cut_requests(self, n: int = 1) -> None:
        self._cut["request"] += n

    def cut_replies(self, n: int = 1) -> None:
        self._cut["reply"] += n

    def refuse(self, on: bool = True) -> None:
        self._refuse = on

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- the proxy (on its loop) -----------------------------------------------------------------

    async def _listen(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            self.counts["connections"] += 1
            if self._refuse:
                self.counts["refused"] += 1
                return
            try:
                server_r, server_w = await asyncio.open_connection(*self.upstream)
            except OSError:
                self.counts["upstream_down"] += 1
                return
            try:
                await asyncio.gather(self._pipe(client_r, server_w, "request"),
                                     self._pipe(server_r, client_w, "reply"))
            finally:
                server_w.close()
        except asyncio.CancelledError:
            pass
        finally:
            client_w.close()
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        """Forward one direction until EOF; a cut closes both directions (the other pipe sees EOF)."""
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                if self._cut[direction] > 0:
                    self._cut[direction] -= 1
                    self.counts["cut_requests" if direction == "request" else "cut_replies"] += 1
                    raise ConnectionAbortedError(direction)
                if not self._flowing.is_set():
                    self.counts["stalled_chunks"] += 1
                    await self._flowing.wait()
                if self._delay_s:
                    self.counts["delayed_chunks"] += 1
                    await asyncio.sleep(self._delay_s)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            # Closing both ends wakes the other pipe, so a connection never lingers half-open.
            writer.close()
            if not reader.at_eof():
                reader.feed_eof()
