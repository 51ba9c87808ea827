"""The chat app's logic without a window: `ChatController` (conversation, settings, the background
worker) against a real verifier on loopback with the shipped drafter.

The worker's events reach the controller through a queue that the test drains on its own thread,
exactly as Kivy's Clock does on the UI thread in the app. Answers are greedy, so each must equal,
character for character, what a plain `EdgeAgent` produces for the same chat.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from pathlib import Path

import pytest

from mobile_app.chat import ChatController
from mobile_app.state import HISTORY_FILE, SETTINGS_FILE, AppSettings, Conversation, Message
from mobile_app.worker import Failed, Finished, Notice, Progress
from tests.live_server import LiveServer, free_port

API_KEY = "k"
QUESTION = "What is the capital of France?"
MAX_TOKENS = 24


def write_profile(path: Path) -> Path:
    """A fixed estimator profile (coefficients measured on this 2-core VM): the server starts without
    profiling itself, and these tests do not depend on how well it predicts batch times."""
    from wisp_cloud.estimator import TimeEstimator, make_metadata

    TimeEstimator((60.0, 1.7, 0.0, 0.02, 0.0), metadata=make_metadata("target", "cpu", "float32")).save(path)
    return path


def verifier_args(profile: Path) -> list[str]:
    # --max-queue 1: a new session is refused (429) whenever a job waits; --max-batch-tokens 512 keeps
    # two 400-token prefills out of one batch, so one of them waits while the other runs.
    return ["--threads", "1", "--profile", str(profile), "--log-level", "warning", "--max-queue", "1",
            "--max-batch-tokens", "512"]


def edge_answer(url: str, question: str, max_tokens: int = MAX_TOKENS) -> str:
    """What the edge engine alone answers (greedy), the reference the app must reproduce."""
    from wisp_edge.agent import EdgeAgent
    from wisp_edge.wire.sampling import SamplingParams
    from wisp_edge.settings import EdgeSettings

    agent = EdgeAgent(EdgeSettings(server=url, api_key=API_KEY, drafter=AppSettings().drafter))
    try:
        prompt = agent.chat_ids([{"role": "user", "content": question}])
        ids = [t.id for t in agent.generate(prompt, max_new_tokens=max_tokens, params=SamplingParams(temperature=0))]
        return agent.detokenize([i for i in ids if i not in agent.eos_ids])
    finally:
        agent.close()
        agent.drafter.close()


def queue_depth(server: LiveServer) -> float:
    with server.client() as client:
        lines = client.get("/metrics").text.splitlines()
    return next(float(line.split()[1]) for line in lines if line.startswith("wisp_queue_depth "))


class Harness:
    """A controller whose 'UI thread' is the test: `pump` runs what the worker handed over."""

    def __init__(self, data_dir: Path, **settings) -> None:
        AppSettings(**{"max_tokens": MAX_TOKENS, "max_wait_s": 1.0, **settings}).save(data_dir / SETTINGS_FILE)
        self.calls: queue.Queue = queue.Queue()
        self.events: list[object] = []
        self.controller = ChatController(data_dir, self.calls.put, health_interval_s=0.5, health_poll_s=0.2)

    def pump(self, until, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not until():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out; events so far: {self.events[-5:]}, "
                                     f"messages: {self.controller.conversation.messages}")
            try:
                call = self.calls.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            self.events.append(call.args[0])
            call()

    def finished(self) -> bool:
        return any(isinstance(e, Finished) and e.turn == self.controller.turn for e in self.events)

    def answer(self) -> Message:
        return self.controller.conversation.messages[-1]

    def close(self) -> None:
        self.controller.close()


@pytest.fixture(scope="module")
def verifier(tmp_path_factory):
    """Not started here: the first test starts it itself, after showing what the app does without it."""
    tmp = tmp_path_factory.mktemp("verifier")
    server = LiveServer(*verifier_args(write_profile(tmp / "profile.json")), log_path=tmp / "server.log",
                        api_key=API_KEY, port=free_port())
    yield server
    server.stop()


@pytest.fixture(scope="module")
def live(verifier):
    if verifier.proc is None:
        verifier.start()
    return verifier


@pytest.fixture(scope="module")
def expected(live):
    return edge_answer(live.url, QUESTION)


@pytest.fixture
def harness(tmp_path, verifier):
    made: list[Harness] = []

    def make(**settings) -> Harness:
        made.append(Harness(tmp_path / f"app{len(made)}", **{"server_url": verifier.url, **settings}))
        return made[-1]

    yield make
    for h in made:
        h.close()


def test_settings_and_history_survive_a_restart(tmp_path):
    first = ChatController(tmp_path, lambda call: None, monitor=False)
    assert first.settings == AppSettings()  # a fresh install: the shipped drafter, loopback verifier
    assert first.settings.drafter == "q4"
    chosen = AppSettings(server_url="http://10.0.0.7:8000", api_key="secret", drafter="student",
                         slo_class="4 tok/s", temperature=0.7, top_p=0.9, max_tokens=64, tint_drafted=False)
    first.update_settings(chosen)
    with pytest.raises(ValueError, match="http"):
        first.update_settings(AppSettings(server_url="10.0.0.7:8000"))
    with pytest.raises(ValueError, match="top_p"):
        first.update_settings(AppSettings(top_p=0.0))
    first.conversation.messages += [Message("user", "Hi"), Message("assistant", "", [("Hello", True), ("!", False)])]
    first.conversation.messages[-1].text = "Hello!"
    first.save_history()
    first.close()

    again = ChatController(tmp_path, lambda call: None, monitor=False)
    assert again.settings == chosen  # the invalid updates were refused, not saved
    assert again.settings.edge_settings().slo_tokens_per_s == 4.0
    assert [(m.role, m.text, m.spans) for m in again.conversation.messages] == [
        ("user", "Hi", []), ("assistant", "Hello!", [("Hello", True), ("!", False)])]
    again.clear()
    assert Conversation.load(tmp_path / HISTORY_FILE).messages == []
    again.close()

    (tmp_path / SETTINGS_FILE).write_text("{not json")
    assert ChatController(tmp_path, lambda call: None, monitor=False).settings == AppSettings()
    assert (tmp_path / (SETTINGS_FILE + ".bad")).read_text() == "{not json"  # kept, not overwritten


def test_unreachable_verifier_is_a_notice_and_the_answer_comes_when_it_returns(verifier, harness, request):
    if verifier.proc is not None:  # started by an earlier test: take it down for this one
        verifier.stop()
    h = harness(api_key=API_KEY)
    assert h.controller.send(QUESTION)
    h.pump(lambda: any(isinstance(e, Notice) for e in h.events))
    notice = h.answer()
    assert notice.role == "notice" and notice.text == f"Cannot reach the verifier at {verifier.url} — retrying…"
    assert h.controller.busy and h.controller.reachable is False
    assert "server unreachable" in h.controller.status_line()

    verifier.start()  # the server returns: the worker notices and answers without being asked again
    h.pump(h.finished)
    want = request.getfixturevalue("expected")
    assert h.answer().role == "assistant" and h.answer().text == want, h.controller.conversation.messages
    assert sum(isinstance(e, Progress) and e.piece != "" for e in h.events) > 1  # streamed, not in one piece
    assert h.controller.reachable is True and not h.controller.busy
    saved = Conversation.load(h.controller.data_dir / HISTORY_FILE).messages
    assert [m.role for m in saved] == ["user", "notice", "assistant"] and saved[-1].text == want
    assert saved[1].text.endswith("the answer went on when it was back.")  # no stale "retrying…" in the history


def test_wrong_api_key_is_a_readable_error_and_the_right_one_works(live, expected, harness, monkeypatch):
    # Wait for the drafter's prefill: on these two shared cores the verifier would otherwise decode much of
    # this short answer alone meanwhile, leaving no drafts to tint.
    monkeypatch.setenv("WISP_EDGE_DECODE_WHILE_PREFILLING", "false")
    h = harness(api_key="wrong")
    h.controller.send(QUESTION)
    h.pump(h.finished)
    assert [type(e) for e in h.events if isinstance(e, (Failed, Finished))] == [Failed, Finished]
    assert h.answer().role == "notice" and h.answer().error
    assert h.answer().text == "The verifier refused the API key (401). Check it in Settings."

    h.controller.update_settings(dataclasses.replace(h.controller.settings, api_key=API_KEY))
    h.controller.send(QUESTION)  # asked again: the unanswered first question is not sent twice
    h.pump(h.finished)
    answer = h.answer()
    assert answer.role == "assistant" and answer.text == expected
    assert answer.drafted_chars > 0  # the tint has something to show: the device's accepted drafts
    status = h.controller.status_line()
    assert all(word in status for word in ("tok/s", "acceptance", "draft", "rtt", "server online")), status
    assert h.controller.stats.rounds >= 1 and h.controller.stats.tokens >= 1


def test_an_overloaded_verifier_is_waited_out(live, expected, harness):
    """Two long prefills that cannot share a batch keep a job waiting, so new sessions get 429."""
    with live.client() as client:
        info = client.get("/v1/info").json()
    long_prompt = [(i * 7919) % (info["vocab_size"] - 2) + 1 for i in range(400)]
    stop = threading.Event()

    def flood() -> None:
        with live.client() as client:
            while not stop.is_set():
                reply = client.post("/v1/sessions", json={"prompt_ids": long_prompt})
                if reply.status_code == 201:
                    client.delete(f"/v1/sessions/{reply.json()['session_id']}")
                else:  # refused itself (the other flood's job was waiting): try again soon
                    time.sleep(0.02)

    floods = [threading.Thread(target=flood, daemon=True) for _ in range(2)]
    for t in floods:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while queue_depth(live) < 1:
            assert time.monotonic() < deadline, "the flood never queued a job"
            time.sleep(0.02)
        h = harness(api_key=API_KEY)
        h.controller.send(QUESTION)
        h.pump(lambda: any(isinstance(e, Notice) for e in h.events))
    finally:
        stop.set()
        for t in floods:
            t.join(30)
    notice = next(e for e in h.events if isinstance(e, Notice))
    assert notice.kind == "busy" and notice.text.startswith("The verifier is overloaded; retry in ")
    assert notice.text.endswith(" s") and int(notice.text.split()[-2]) >= 1
    h.pump(h.finished)
    assert h.answer().role == "assistant" and h.answer().text == expected


def test_stop_ends_the_answer_early_and_keeps_what_was_said(live, harness):
    h = harness(api_key=API_KEY, max_tokens=200)
    h.controller.send("Write a long story about a dragon who learns to bake bread.")
    h.pump(lambda: any(isinstance(e, Progress) and e.piece for e in h.events))
    h.controller.stop()
    assert "stopping" in h.controller.status_line()
    h.pump(h.finished)
    finished = next(e for e in h.events if isinstance(e, Finished))
    answer = h.answer()
    assert finished.cancelled and answer.role == "assistant" and answer.stopped
    assert 1 <= finished.tokens < 60 and answer.text  # stopped within a round or two, not at 200 tokens
    assert not h.controller.busy and not h.controller.worker.busy
    assert Conversation.load(h.controller.data_dir / HISTORY_FILE).messages[-1].stopped


def test_markup_tints_the_drafted_tokens_and_shows_brackets_as_typed():
    from mobile_app.render import DRAFT_TINT, markup_to_text, message_markup

    answer = Message("assistant", "a [b] & c", [("a [b]", True), (" & c", False)], stopped=True)
    tinted = message_markup(answer, tint=True)
    assert tinted.startswith(f"[color={DRAFT_TINT}]a &bl;b&br;[/color] &amp; c")
    assert markup_to_text(tinted) == "a [b] & c  (stopped)"
    assert "[color" not in message_markup(Message("assistant", "x", [("x", True)]), tint=False)
    assert message_markup(Message("user", "[i]hi[/i]"), tint=True) == "&bl;i&br;hi&bl;/i&br;"


def test_the_android_package_folder_holds_everything_the_spec_names(tmp_path):
    """What buildozer would package: main.py at the top, both packages, the drafter; and the spec agrees."""
    import configparser
    import subprocess
    import sys

    from mobile_app.android_stage import STAGE, stage
    from tests.live_server import ROOT

    out = tmp_path / "app"
    stage("q4", out)
    assert (out / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf").exists() and (out / "models/predictor/q4.npz").exists()
    assert not (out / "mobile_app" / "android").exists()  # build inputs stay out of the APK
    # The staged folder runs on its own: the packages and the drafter resolve inside it.
    code = "import mobile_app.worker, wisp_edge.drafters as d, sys; print(d.MODELS_DIR, mobile_app.worker.__file__)"
    run = subprocess.run([sys.executable, "-c", code], cwd=out, capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(out)})
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [str(out / "models"), str(out / "mobile_app" / "worker.py")]

    spec = configparser.ConfigParser()
    spec.read(ROOT / "mobile_app" / "buildozer.spec")
    app = spec["app"]
    spec_dir = ROOT / "mobile_app"
    assert (spec_dir / app["source.dir"]).resolve() == STAGE
    requirements = [r.split("==")[0] for r in app["requirements"].split(",")]
    assert {"python3", "kivy", "numpy", "httpx", "pydantic", "pydantic-core", "llama-cpp-python"} <= set(requirements)
    assert (spec_dir / app["p4a.local_recipes"] / "llama-cpp-python" / "__init__.py").exists()
    assert (spec_dir / app["android.extra_manifest_application_arguments"]).read_text().strip() == \
        'android:usesCleartextTraffic="true"'
    assert {"gguf", "kv", "py"} <= set(app["source.include_exts"].split(","))
