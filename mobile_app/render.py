"""Messages as Kivy label markup: the tint on drafted tokens, escaping, and back to plain text (no Kivy import)."""

from __future__ import annotations

import re

from mobile_app.state import Message

DRAFT_TINT = "8fe3ae"  # drafted by the device and accepted by the verifier
MUTED = "9aa3b5"


def escape(text: str) -> str:
    """Kivy markup's escapes (as kivy.utils.escape_markup): text shows as typed, never as a tag."""
    return text.replace("&", "&amp;").replace("[", "&bl;").replace("]", "&br;")


def message_markup(message: Message, tint: bool) -> str:
    if message.role == "assistant" and tint:
        body = "".join(f"[color={DRAFT_TINT}]{escape(text)}[/color]" if drafted else escape(text)
                       for text, drafted in message.spans)
    else:
        body = escape(message.text)
    if message.stopped:
        body += f"  [i][color={MUTED}](stopped)[/color][/i]"
    return body


def markup_to_text(markup: str) -> str:
    """What a markup label shows, as plain text."""
    text = re.sub(r"\[/?(?:color|b|i)(?:=[^\]]*)?\]", "", markup)
    return text.replace("&bl;", "[").replace("&br;", "]").replace("&amp;", "&")
