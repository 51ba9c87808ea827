"""Token ids to text for the OpenAI endpoints: incremental decoding and stop strings.

Decoding token by token breaks characters that span tokens (emoji, CJK in byte-level BPE): a
lone piece decodes to U+FFFD. `IncrementalDecoder` re-decodes a short window and releases text
only once it no longer ends in a partial character, the approach of TGI and vLLM.
"""

from __future__ import annotations

from collections.abc import Callable


class IncrementalDecoder:
    """`decode` turns a list of ids into text (a tokenizer's decode, or a drafter's detokenize)."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self.ids: list[int] = []
        self._prefix = 0  # window start: tokens before it are settled
        self._read = 0  # tokens whose text has been released

    def push(self, token: int) -> str:
        """Add a token; return the text it completes ('' while a character is still partial)."""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix: self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is left (a partial character at the very end decodes as U+FFFD)."""
        before = self._decode(self.ids[self._prefix: self._read])
        after = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return after[len(before):]


class StopMatcher:
    """Holds back text that could be the start of a stop string; cuts at the first stop found."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.sent = 0

    def feed(self, delta: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string was hit)."""
        self.text += delta
        hits = [i for i in (self.text.find(s, max(0, self.sent - self.hold)) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            out = self.text[self.sent: cut] if cut > self.sent else ""
            self.text, self.sent = self.text[:cut], cut
            return out, True
        safe = len(self.text) - self.hold
        if safe > self.sent:
            out, self.sent = self.text[self.sent: safe], safe
            return out, False
        return "", False

    def finish(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out
