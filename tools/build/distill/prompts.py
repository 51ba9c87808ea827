"""Chat prompts for distillation, built only from text already on this machine.

The student must imitate the target on *chat* traffic, so we wrap local text (fortunes, Python
stdlib docstrings, licenses, /usr/share/doc) in varied user instructions. Everything is
deterministic: snippets are sorted, templates are chosen by hash, and the held-out split is a
hash of the *source text*, so no held-out passage ever appears in training under another template.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import inspect
import json
import random
import re
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

FORTUNE_DIR = Path("/usr/share/games/fortunes")
LICENSE_DIR = Path("/usr/share/common-licenses")
DOC_DIR = Path("/usr/share/doc")
HELDOUT_MODULUS = 40  # source text with hash % 40 == 0 is held out (~2.5%)
MIN_CHARS, MAX_CHARS = 60, 700

# Modules whose import has side effects (opens a browser, prints, needs a display) or is slow.
_SKIP_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "__phello__", "_pyrepl",
                 "ensurepip", "venv", "lib2to3", "pydoc_data", "xxsubtype", "xxlimited", "xxlimited_35",
                 "sre_compile", "sre_parse", "sre_constants", "asyncio.__main__"}

PASSAGE_TEMPLATES = [
    "Summarize the following text:\n\n{t}",
    "Explain in simple terms what this means:\n\n{t}",
    "What is the main idea of this passage?\n\n{t}",
    "Write a short story inspired by this:\n\n{t}",
    "Rewrite this in your own words:\n\n{t}",
    "Give three key points from the following text.\n\n{t}",
    "{t}\n\nWhat do you think about this?",
    "Read this and answer: who would find it useful, and why?\n\n{t}",
    "Translate the following into plain, friendly English:\n\n{t}",
    "Write a short poem based on this text:\n\n{t}",
    "{t}\n\nCan you explain this to a ten-year-old?",
    "Continue the following text:\n\n{t}",
]
TOPIC_TEMPLATES = [
    "Write a short story about {x}.",
    "Explain {x}.",
    "What is {x}?",
    "Tell me something interesting about {x}.",
    "Give me three tips related to {x}.",
    "Why does {x} matter?",
    "Write a haiku about {x}.",
    "Describe {x} in a few sentences.",
]
CODE_TEMPLATES = [
    "What does the Python function `{x}` do?",
    "How do I use `{x}` in Python? Here is its documentation:\n\n{t}",
    "Explain this Python documentation:\n\n{t}",
    "Write a small Python example that uses `{x}`.",
    "Summarize the documentation of `{x}`:\n\n{t}",
]


@dataclass(frozen=True)
class Prompt:
    id: str  # sha1 of source + template, stable across runs
    source: str  # fortune | pydoc | license | doc
    text_hash: str  # sha1 of the source text: decides the held-out split
    prompt: str  # the user message (apply the chat template to use it)


def _sha1(s: str) -> str:
    return hashlib.sha1(s.encode("utf-8", "replace")).hexdigest()


def _clean(text: str) -> str:
    return re.sub(r"[ \t]+", " ", text.replace("\r", "")).strip()


def _paragraphs(text: str) -> list[str]:
    return [p for p in (_clean(x) for x in re.split(r"\n\s*\n", text)) if MIN_CHARS <= len(p) <= MAX_CHARS]


def fortune_snippets() -> list[str]:
    out = []
    for path in sorted(FORTUNE_DIR.glob("*")) if FORTUNE_DIR.is_dir() else []:
        if path.suffix or not path.is_file():
            continue  # skip .dat indexes and .u8 duplicates
        text = path.read_text(encoding="utf-8", errors="replace")
        out += [c for c in (_clean(x) for x in text.split("\n%\n")) if MIN_CHARS <= len(c) <= MAX_CHARS]
    return out


def pydoc_snippets() -> list[tuple[str, str]]:
    """(qualified name, docstring) for stdlib modules and their public functions/classes."""
    out: list[tuple[str, str]] = []
    names = sorted(n for n in getattr(sys, "stdlib_module_names", ()) if not n.startswith("_") and n not in _SKIP_MODULES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            try:
                mod = importlib.import_module(name)
            except Exception:  # noqa: BLE001 - platform-specific modules are fine to skip
                continue
            items = [(name, mod)] + [(f"{name}.{k}", v) for k, v in sorted(vars(mod).items())
                                     if not k.startswith("_") and (inspect.isfunction(v) or inspect.isclass(v)
                                                                   or inspect.isbuiltin(v))]
            for qual, obj in items:
                doc = inspect.getdoc(obj) or ""
                doc = _clean(doc.split("\n\n")[0] if len(doc) > MAX_CHARS else doc)
                if MIN_CHARS <= len(doc) <= MAX_CHARS:
                    out.append((qual, doc))
    return sorted(set(out))


def file_snippets(root: Path, max_per_file: int = 6) -> list[str]:
    out = []
    if not root.is_dir():
        return out
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        try:
            raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError, EOFError):
            continue
        paras = [p for p in _paragraphs(text)
                 if sum(c.isalpha() for c in p) > 0.6 * len(p) and p.count("<") < 3 and "http" not in p[:40]]
        out += paras[:max_per_file]
    return out


def _topic(text: str) -> str:
    """A short noun-ish phrase from a passage: its first few words, trimmed of punctuation."""
    words = re.findall(r"[A-Za-z][A-Za-z'-]*", text)[:6]
    return " ".join(words).lower() if len(words) >= 2 else "the sea"


def build_prompts() -> list[Prompt]:
    """Every prompt from every local source, sorted by id (deterministic)."""
    seen, prompts = set(), []

    def add(source: str, text: str, msg: str) -> None:
        pid = _sha1(source + "\0" + msg)
        if pid not in seen:
            seen.add(pid)
            prompts.append(Prompt(pid, source, _sha1(text), msg))

    for source, snippets in (("fortune", fortune_snippets()), ("license", file_snippets(LICENSE_DIR, 40)),
                             ("doc", file_snippets(DOC_DIR))):
        for text in snippets:
            h = int(_sha1(text)[:8], 16)
            add(source, text, PASSAGE_TEMPLATES[h % len(PASSAGE_TEMPLATES)].format(t=text))
            if h % 3 == 0:
                add(source, text, TOPIC_TEMPLATES[(h // 7) % len(TOPIC_TEMPLATES)].format(x=_topic(text)))
    for qual, doc in pydoc_snippets():
        h = int(_sha1(doc)[:8], 16)
        add("pydoc", doc, CODE_TEMPLATES[h % len(CODE_TEMPLATES)].format(x=qual, t=doc))
    return sorted(prompts, key=lambda p: p.id)


def is_heldout(p: Prompt) -> bool:
    return int(p.text_hash[:8], 16) % HELDOUT_MODULUS == 0


def split_prompts(prompts: list[Prompt], n_heldout: int = 200, seed: int = 0) -> tuple[list[Prompt], list[Prompt]]:
    """(train, heldout): disjoint by source-text hash; train is shuffled with `seed`."""
    held = [p for p in prompts if is_heldout(p)]
    train = [p for p in prompts if not is_heldout(p)]
    rng = random.Random(seed)
    rng.shuffle(held)
    rng.shuffle(train)
    return train, sorted(held[:n_heldout], key=lambda p: p.id)


def write_jsonl(prompts: list[Prompt], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps(asdict(p), ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[Prompt]:
    with open(path, encoding="utf-8") as f:
        return [Prompt(**json.loads(line)) for line in f if line.strip()]


def chat_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of the ChatML-templated user turn, ending with the assistant header."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
