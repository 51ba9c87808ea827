"""What the app remembers between runs: its settings and the conversation, as JSON in the user data dir.

No Kivy here, so the logic is testable without a window. Files are written atomically (a temporary
file, then a rename), so a phone killed mid-write keeps the previous version; an unreadable file
loads as defaults and is set aside as `<name>.bad` rather than crashing the app at start.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

from wisp_edge.wire.sampling import SamplingParams
from wisp_edge.settings import EdgeSettings

SETTINGS_FILE = "settings.json"
HISTORY_FILE = "history.json"

# The paper's SLO classes: a sustained rate the verifier's scheduler plans for; best effort asks for none.
SLO_CLASSES: dict[str, float | None] = {"best effort": None, "2 tok/s": 2.0, "4 tok/s": 4.0, "6 tok/s": 6.0,
                                        "8 tok/s": 8.0}
DEFAULT_DRAFTER = EdgeSettings.model_fields["drafter"].default  # the shipped 4-bit copy of the target


@dataclass
class AppSettings:
    server_url: str = EdgeSettings.model_fields["server"].default
    api_key: str = ""
    drafter: str = DEFAULT_DRAFTER  # a shipped name (q4, student) or a .gguf / .onnx path
    slo_class: str = "best effort"
    temperature: float = 0.0  # 0: greedy, the target's own answer token for token
    top_p: float = 1.0
    max_tokens: int = 256
    tint_drafted: bool = True  # colour the tokens the device drafted and the verifier accepted
    threads: int = 1  # drafter threads: one core drafts, the rest keep the phone responsive
    max_wait_s: float = 5.0  # the client's own retries before the app tells the user and retries itself

    def validate(self) -> None:
        """Raise ValueError with a message a user can act on."""
        if not self.server_url.startswith(("http://", "https://")):
            raise ValueError("The server URL must start with http:// or https://")
        if self.slo_class not in SLO_CLASSES:
            raise ValueError(f"Unknown SLO class {self.slo_class!r}; choose one of {', '.join(SLO_CLASSES)}")
        if not self.drafter.strip():
            raise ValueError("Choose a drafter: q4, student, or the path of a .gguf / .onnx file")
        if not 1 <= self.max_tokens <= 4096:
            raise ValueError("Maximum tokens must be between 1 and 4096")
        if self.threads < 1 or self.max_wait_s <= 0:
            raise ValueError("Threads must be at least 1 and the wait positive")
        self.sampling()  # temperature and top-p, checked where they are defined

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p)

    def edge_settings(self) -> EdgeSettings:
        return EdgeSettings(server=self.server_url.rstrip("/"), api_key=self.api_key or None, drafter=self.drafter,
                            threads=self.threads, slo_tokens_per_s=SLO_CLASSES[self.slo_class],
                            max_wait_s=self.max_wait_s)

    @classmethod
    def from_dict(cls, data: dict) -> "AppSettings":
        """Known keys only, each coerced to its field's type: a file from an older or newer app still loads."""
        values = {}
        for f in fields(cls):
            if f.name in data:
                kind = {"bool": bool, "int": int, "float": float}.get(str(f.type), str)
                values[f.name] = kind(data[f.name])
        settings = cls(**values)
        settings.validate()
        return settings

    @classmethod
    def load(cls, path: Path) -> "AppSettings":
        data = _read_json(path)
        if data is None:
            return cls()
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError):
            _set_aside(path)
            return cls()

    def save(self, path: Path) -> None:
        _write_json(path, asdict(self))


Role = Literal["user", "assistant", "notice"]


@dataclass
class Message:
    """One entry of the chat. An assistant message keeps its text as spans (text, drafted by the device)."""

    role: Role
    text: str = ""
    spans: list[tuple[str, bool]] = field(default_factory=list)
    stopped: bool = False  # the user pressed stop: the answer is partial
    error: bool = False  # a notice that ended the turn (as opposed to one the app is retrying from)

    def add(self, piece: str, from_draft: bool) -> None:
        if not piece:
            return
        self.text += piece
        if self.spans and self.spans[-1][1] == from_draft:
            self.spans[-1] = (self.spans[-1][0] + piece, from_draft)
        else:
            self.spans.append((piece, from_draft))

    @property
    def drafted_chars(self) -> int:
        return sum(len(text) for text, drafted in self.spans if drafted)

    def to_dict(self) -> dict:
        return {"role": self.role, "text": self.text, "spans": [[t, d] for t, d in self.spans],
                "stopped": self.stopped, "error": self.error}

    @classmethod
    def from_dict(cls, data: dict) -> "Message":
        spans = [(str(t), bool(d)) for t, d in data.get("spans", [])]
        return cls(data["role"], str(data.get("text", "")), spans, bool(data.get("stopped")),
                   bool(data.get("error")))


@dataclass
class Conversation:
    messages: list[Message] = field(default_factory=list)

    def chat_messages(self) -> list[dict]:
        """What the model sees: users and assistants only; notices are the app talking, not the model.

        A question whose turn ended without an answer (an error) is left out, so asking it again
        does not send it twice; the last question is always in.
        """
        turns = [m for m in self.messages if m.role in ("user", "assistant") and m.text]
        return [{"role": m.role, "content": m.text} for i, m in enumerate(turns)
                if m.role == "assistant" or i == len(turns) - 1 or turns[i + 1].role == "assistant"]

    def clear(self) -> None:
        self.messages.clear()

    @classmethod
    def load(cls, path: Path) -> "Conversation":
        data = _read_json(path)
        if data is None:
            return cls()
        try:
            return cls([Message.from_dict(m) for m in data["messages"] if m["role"] in ("user", "assistant",
                                                                                          "notice")])
        except (KeyError, TypeError, ValueError):
            _set_aside(path)
            return cls()

    def save(self, path: Path) -> None:
        _write_json(path, {"version": 1, "messages": [m.to_dict() for m in self.messages]})


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        _set_aside(path)
        return None
    if not isinstance(data, dict):
        _set_aside(path)
        return None
    return data


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _set_aside(path: Path) -> None:
    """Keep an unreadable file for inspection instead of overwriting it with defaults."""
    try:
        os.replace(path, path.with_name(path.name + ".bad"))
    except OSError:
        pass
