"""The chat's state on the UI thread: conversation, settings, the worker's events, the status line.

`ChatController` is everything the screens do, minus the widgets: the app calls `send`, `stop`,
`update_settings`, `clear`, and redraws when told through `on_message(index)`, `on_reset()` and
`on_status()`. Worker events reach `handle` through `to_ui`, the app's "run this on the UI thread"
(Kivy's Clock in the app, a queue in the tests), so all state changes happen on one thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path

from mobile_app.state import HISTORY_FILE, SETTINGS_FILE, AppSettings, Conversation, Message
from mobile_app.worker import Activity, Failed, Finished, GenerationWorker, LiveStats, Notice, Progress, Reachability
from wisp_edge.health import is_healthy

# What a "retrying…" notice becomes when its turn ends (answered, stopped), so a restored history is not stale.
RETRY_OUTCOMES = {
    "unreachable": ("The verifier at {url} could not be reached for a while; the answer went on when it was back.",
                    "The verifier at {url} could not be reached."),
    "busy": ("The verifier was overloaded for a while; the answer waited for it.", "The verifier was overloaded."),
}


class HealthMonitor:
    """Polls the verifier's /health in a daemon thread and reports changes (the status line's 'server')."""

    def __init__(self, url: str, post: Callable[[object], None], *, interval_s: float = 5.0) -> None:
        self.url, self.post, self.interval_s = url, post, interval_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wisp-health", daemon=True)

    def start(self) -> "HealthMonitor":
        self._thread.start()
        return self

    def check_now(self, url: str | None = None) -> None:
        if url is not None:
            self.url = url
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            url = self.url
            self.post(Reachability(url, is_healthy(url)))
            self._wake.wait(self.interval_s)
            self._wake.clear()


class ChatController:
    def __init__(self, data_dir: str | Path, to_ui: Callable[[Callable[[], None]], None], *,
                 health_interval_s: float = 5.0, health_poll_s: float = 1.0, monitor: bool = True) -> None:
        self.data_dir = Path(data_dir)
        self.settings = AppSettings.load(self.data_dir / SETTINGS_FILE)
        self.conversation = Conversation.load(self.data_dir / HISTORY_FILE)
        self.to_ui = to_ui
        self.worker = GenerationWorker(self._post, health_poll_s=health_poll_s)
        self.monitor = HealthMonitor(self.settings.server_url, self._post, interval_s=health_interval_s)
        if monitor:
            self.monitor.start()
        # What the view listens to; the app replaces these.
        self.on_message: Callable[[int], None] = lambda index: None
        self.on_reset: Callable[[], None] = lambda: None
        self.on_status: Callable[[], None] = lambda: None
        self.turn = 0
        self.busy = False
        self.stopping = False
        self.stats: LiveStats | None = None
        self.reachable: bool | None = None  # None: not known yet
        self.activity = ""
        self._answer: int | None = None  # index of this turn's assistant message, once it has text
        self._notice: int | None = None  # index of this turn's notice, updated in place while retrying
        self._retrying: str | None = None  # the kind of the latest retry notice of this turn

    def _post(self, event: object) -> None:
        """Called from worker threads: hand the event to the UI thread."""
        self.to_ui(partial(self.handle, event))

    # --- what the screens call ---------------------------------------------------------------------

    def send(self, text: str) -> bool:
        text = text.strip()
        if not text or self.busy:
            return False
        self.turn += 1
        self.busy, self.stopping, self.activity = True, False, ""
        self._answer = self._notice = self._retrying = None
        self._append(Message("user", text))
        self.save_history()
        self.worker.start(self.turn, self.conversation.chat_messages(), self.settings)
        self.on_status()
        return True

    def stop(self) -> None:
        if self.busy:
            self.stopping = True
            self.worker.cancel()
            self.on_status()

    def update_settings(self, settings: AppSettings) -> None:
        """Validate (ValueError with a readable message), persist, apply to the next turn."""
        settings.validate()
        url_changed = settings.server_url != self.settings.server_url
        self.settings = settings
        settings.save(self.data_dir / SETTINGS_FILE)
        if url_changed:
            self.reachable = None
            self.monitor.check_now(settings.server_url)
        self.on_reset()  # the tint may have changed
        self.on_status()

    def clear(self) -> None:
        if self.busy:
            return
        self.conversation.clear()
        self.save_history()
        self.on_reset()

    def save_history(self) -> None:
        self.conversation.save(self.data_dir / HISTORY_FILE)

    def close(self) -> None:
        self.monitor.stop()
        self.worker.close()
        self.save_history()

    # --- worker events (UI thread) -----------------------------------------------------------------

    def handle(self, event: object) -> None:
        if isinstance(event, Reachability):
            if event.url == self.settings.server_url and event.reachable != self.reachable:
                self.reachable = event.reachable
                self.on_status()
            return
        if getattr(event, "turn", None) != self.turn:
            return  # from a turn that has ended
        if isinstance(event, Progress):
            if self._answer is None:
                if not event.piece:
                    return
                self._answer = self._append(Message("assistant"))
            self.conversation.messages[self._answer].add(event.piece, event.from_draft)
            self.on_message(self._answer)
            if event.stats is not None:
                self.stats = event.stats
            self.activity = ""
            self.on_status()
        elif isinstance(event, Notice):
            self._show_notice(event.text, error=False)
            self._retrying = event.kind
        elif isinstance(event, Failed):
            self._show_notice(event.text, error=True)
        elif isinstance(event, Activity):
            self.activity = event.text
            self.on_status()
        elif isinstance(event, Finished):
            if self._retrying and self._notice is not None and not self.conversation.messages[self._notice].error:
                outcome = RETRY_OUTCOMES[self._retrying][event.cancelled]
                self.conversation.messages[self._notice].text = outcome.format(url=self.settings.server_url)
                self.on_message(self._notice)
            if event.cancelled:
                if self._answer is not None:
                    self.conversation.messages[self._answer].stopped = True
                    self.on_message(self._answer)
                else:
                    self._notice = None  # a line of its own, under any "retrying" notice
                    self._show_notice("Stopped before the answer began.", error=False)
            self.busy = self.stopping = False
            self.activity = ""
            self.save_history()
            self.on_status()

    def _show_notice(self, text: str, *, error: bool) -> None:
        """One notice per turn, replaced while the worker retries, so an outage is one line, not a stream."""
        if self._notice is not None and self._notice == len(self.conversation.messages) - 1:
            notice = self.conversation.messages[self._notice]
            notice.text, notice.error = text, error
            self.on_message(self._notice)
        else:
            self._notice = self._append(Message("notice", text, error=error))
        self.save_history()

    def _append(self, message: Message) -> int:
        self.conversation.messages.append(message)
        index = len(self.conversation.messages) - 1
        self.on_message(index)
        return index

    # --- the status line ---------------------------------------------------------------------------

    def status_line(self) -> str:
        server = {None: "server ?", True: "server online", False: "server unreachable"}[self.reachable]
        parts = []
        if self.stats is not None:
            s = self.stats
            parts += [f"{s.tokens_per_s:.1f} tok/s", f"acceptance {s.acceptance:.0%}", f"draft {s.draft_length}",
                      f"rtt {s.rtt_ms:.0f} ms"]
        parts.append(server)
        if self.stopping:
            parts.append("stopping…")
        elif self.activity:
            parts.append(self.activity)
        return "  ·  ".join(parts)

