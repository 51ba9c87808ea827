"""The WISP chat app (Kivy): the drafter runs here, the verifier in the cloud, the answer streams in.

    python -m mobile_app                        # desktop; settings and history in the user data dir
    python -m mobile_app --send "Hi" --screenshot shot.png --transcript chat.json --quit

The widgets only draw: `ChatController` (chat.py) holds the conversation and settings and runs the
background worker; its events arrive here through Clock, on the UI thread. `--send` types a
message into the input box and taps Send once the app is up, `--screenshot` / `--transcript`
record the screen and what the chat shows once the answer is complete, `--quit` then exits: the
UI test and the README screenshot use them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python mobile_app/main.py, or Android's main.py shim)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("KIVY_NO_ARGS", "1")  # our flags are ours, not Kivy's

from kivy.config import Config  # noqa: E402  (must precede the window's creation)
from kivy.utils import platform  # noqa: E402

if platform not in ("android", "ios"):
    Config.set("graphics", "width", "420")  # a phone-shaped window on the desktop
    Config.set("graphics", "height", "760")
Config.set("input", "mouse", "mouse,disable_multitouch")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402

from kivy.app import App  # noqa: E402
from kivy.clock import Clock  # noqa: E402
from kivy.lang import Builder  # noqa: E402
from kivy.properties import BooleanProperty, ListProperty, StringProperty  # noqa: E402
from kivy.uix.label import Label  # noqa: E402
from kivy.uix.screenmanager import NoTransition, Screen, ScreenManager  # noqa: E402

from mobile_app.chat import ChatController  # noqa: E402
from mobile_app.render import markup_to_text, message_markup  # noqa: E402
from mobile_app.state import SETTINGS_FILE, AppSettings  # noqa: E402

for _name in ("httpx", "httpcore"):  # Kivy's logger shows everything; one line per HTTP request is noise
    logging.getLogger(_name).setLevel(logging.WARNING)

KV_FILE = Path(__file__).with_name("wisp_chat.kv")


def _on_ui_thread(fn) -> None:
    Clock.schedule_once(lambda dt: fn(), 0)


# Bubble colours: the user blue, the model slate; a notice amber while the app retries, red when it ended the turn.
BUBBLES = {"user": (0.17, 0.33, 0.6, 1), "assistant": (0.2, 0.22, 0.27, 1), "notice": (0.42, 0.32, 0.1, 1),
           "error": (0.55, 0.18, 0.16, 1)}


class MessageView(Label):
    role = StringProperty("assistant")
    bubble = ListProperty(BUBBLES["assistant"])


class ChatScreen(Screen):
    pass


class SettingsScreen(Screen):
    pass


@dataclasses.dataclass
class Script:
    """A scripted session for tests and screenshots (see the module docstring)."""

    send: str | None = None
    screenshot: Path | None = None
    transcript: Path | None = None
    quit: bool = False
    timeout_s: float = 300.0


class WispChatApp(App):
    title = "WISP chat"
    busy = BooleanProperty(False)
    status = StringProperty("")
    tint = BooleanProperty(True)

    def __init__(self, data_dir: Path | None = None, script: Script | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self._data_dir = data_dir
        self.script = script or Script()
        self.exit_code = 0
        self._views: list[MessageView] = []

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            self._data_dir = Path(os.environ.get("WISP_APP_DATA") or self.user_data_dir)
        return self._data_dir

    def build(self):
        from kivy.core.window import Window

        Window.softinput_mode = "below_target"  # Android: the on-screen keyboard pushes the input box up
        Builder.load_file(str(KV_FILE))
        self.controller = ChatController(self.data_dir, _on_ui_thread)
        self.controller.on_message = self._show_message
        self.controller.on_reset = self._rebuild
        self.controller.on_status = self._refresh_status
        self.tint = self.controller.settings.tint_drafted
        self.screens = ScreenManager(transition=NoTransition())
        self.chat_screen = ChatScreen(name="chat")
        self.settings_screen = SettingsScreen(name="settings")
        self.screens.add_widget(self.chat_screen)
        self.screens.add_widget(self.settings_screen)
        self._following = True
        self.chat_screen.ids.scroll.bind(scroll_y=self._on_scroll)
        self.chat_screen.ids.messages.bind(height=self._on_content_height)
        self._rebuild()
        self._refresh_status()
        return self.screens

    def on_start(self) -> None:
        if self.script.send is not None:
            Clock.schedule_once(self._script_send, 0.3)
        elif self.script.screenshot or self.script.transcript or self.script.quit:
            Clock.schedule_once(self._script_record, 1.0)  # the chat as restored from the history

    def on_pause(self) -> bool:
        return True  # Android: keep the conversation (and a running answer) while in the background

    def on_stop(self) -> None:
        self.controller.close()

    # --- chat screen -------------------------------------------------------------------------------

    def send(self) -> None:
        box = self.chat_screen.ids.input
        if self.controller.send(box.text):
            box.text = ""
        box.focus = True

    def stop_answer(self) -> None:  # (App.stop quits the app)
        self.controller.stop()

    def clear(self) -> None:
        self.controller.clear()

    def set_tint(self, on: bool) -> None:
        self.controller.update_settings(dataclasses.replace(self.controller.settings, tint_drafted=on))

    def _show_message(self, index: int) -> None:
        messages = self.controller.conversation.messages
        if index > len(self._views):
            self._rebuild()
            return
        if index == len(self._views):
            view = MessageView()
            self._views.append(view)
            self.chat_screen.ids.messages.add_widget(view)
        view = self._views[index]
        message = messages[index]
        view.role = message.role
        view.bubble = BUBBLES["error" if message.error else message.role]
        view.text = message_markup(message, self.tint)

    def _rebuild(self) -> None:
        self.tint = self.controller.settings.tint_drafted
        self.chat_screen.ids.messages.clear_widgets()
        self._views = []
        for index in range(len(self.controller.conversation.messages)):
            self._show_message(index)

    def _on_scroll(self, scroll, scroll_y: float) -> None:
        self._following = scroll_y <= 0.02 or self.chat_screen.ids.messages.height <= scroll.height

    def _on_content_height(self, content, height: float) -> None:
        """Keep the newest text in view as the answer grows, unless the user scrolled up to read."""
        scroll = self.chat_screen.ids.scroll
        if self._following:
            scroll.scroll_y = 0 if height > scroll.height else 1  # short chats sit at the top

    def _refresh_status(self) -> None:
        self.busy = self.controller.busy
        self.status = self.controller.status_line()

    # --- settings screen ---------------------------------------------------------------------------

    def open_settings(self) -> None:
        s, ids = self.controller.settings, self.settings_screen.ids
        ids.server_url.text, ids.api_key.text, ids.drafter.text = s.server_url, s.api_key, s.drafter
        ids.slo_class.text = s.slo_class
        ids.temperature.text, ids.top_p.text, ids.max_tokens.text = str(s.temperature), str(s.top_p), str(s.max_tokens)
        ids.tint_drafted.active = s.tint_drafted
        ids.error.text = ""
        self.screens.current = "settings"

    def close_settings(self, save: bool) -> None:
        ids = self.settings_screen.ids
        if save:
            try:
                settings = dataclasses.replace(
                    self.controller.settings, server_url=ids.server_url.text.strip(), api_key=ids.api_key.text.strip(),
                    drafter=ids.drafter.text.strip(), slo_class=ids.slo_class.text,
                    temperature=_number(ids.temperature.text, float, "Temperature"),
                    top_p=_number(ids.top_p.text, float, "Top-p"),
                    max_tokens=_number(ids.max_tokens.text, int, "Maximum tokens"),
                    tint_drafted=ids.tint_drafted.active)
                self.controller.update_settings(settings)
            except ValueError as exc:
                ids.error.text = str(exc)
                return
        self.screens.current = "chat"

    # --- scripted sessions -------------------------------------------------------------------------

    def _script_send(self, dt: float) -> None:
        ids = self.chat_screen.ids
        ids.input.focus = True
        ids.input.insert_text(self.script.send)  # as if typed
        ids.send_button.trigger_action(duration=0)  # as if tapped
        self._script_deadline = time.monotonic() + self.script.timeout_s
        Clock.schedule_interval(self._script_wait, 0.2)

    def _script_wait(self, dt: float) -> bool | None:
        if self.controller.busy:
            if time.monotonic() > self._script_deadline and not self.controller.stopping:
                self.exit_code = 3  # the answer did not finish in time: stop it, record what there is
                self.controller.stop()
            return None
        Clock.schedule_once(self._script_record, 0.6)  # let the last frames draw
        return False

    def _script_record(self, dt: float) -> None:
        if self.script.transcript is not None:
            shown = [{"role": v.role, "text": markup_to_text(v.text), "markup": v.text} for v in self._views]
            self.script.transcript.write_text(json.dumps(
                {"messages": shown, "status": self.status, "busy": self.controller.busy}, indent=1) + "\n")
        if self.script.screenshot is not None:
            self._screenshot(self.script.screenshot, then=self._script_done)
        else:
            self._script_done()

    def _script_done(self) -> None:
        if self.script.quit:
            self.stop()

    def _screenshot(self, path: Path, then) -> None:
        """Read the frame just drawn, before the buffers swap (after a swap the back buffer may be blank)."""
        from kivy.core.window import Window

        def grab(*args) -> None:
            Window.unbind(on_flip=grab)
            os.replace(Window.screenshot(name=str(path)), path)
            Clock.schedule_once(lambda dt: then(), 0)

        Window.bind(on_flip=grab)  # bound handlers run before the default one, which swaps
        Window.canvas.ask_update()


def _number(text: str, kind: type, what: str):
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not a number") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mobile_app", description="WISP chat (Kivy)")
    parser.add_argument("--data-dir", type=Path, help="settings and history (default: the app's user data dir, "
                                                      "or $WISP_APP_DATA)")
    parser.add_argument("--server", help="set the verifier URL (saved in the settings)")
    parser.add_argument("--api-key", help="set the verifier's API key (saved in the settings)")
    parser.add_argument("--send", help="type this message and send it once the app is up")
    parser.add_argument("--screenshot", type=Path, help="save a PNG of the window once the answer is complete")
    parser.add_argument("--transcript", type=Path, help="write what the chat shows as JSON once the answer is complete")
    parser.add_argument("--quit", action="store_true", help="exit after --send's answer (and the recordings)")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="longest wait for --send's answer")
    args = parser.parse_args(argv)
    script = Script(args.send, args.screenshot, args.transcript, args.quit, args.timeout_s)
    app = WispChatApp(data_dir=args.data_dir, script=script)
    if args.server or args.api_key is not None:
        _preset(app.data_dir, args.server, args.api_key)
    app.run()
    return app.exit_code


def _preset(data_dir: Path, server: str | None, api_key: str | None) -> None:
    """Write --server / --api-key into the settings before the app reads them (the desktop launcher uses it)."""
    path = data_dir / SETTINGS_FILE
    settings = AppSettings.load(path)
    if server:
        settings = dataclasses.replace(settings, server_url=server)
    if api_key is not None:
        settings = dataclasses.replace(settings, api_key=api_key)
    settings.validate()
    settings.save(path)


if __name__ == "__main__":
    sys.exit(main())
