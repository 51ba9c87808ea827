"""A drafter and the target joined in one process: the vocabulary check, the engine, the chat prompt.

Used by `wisp-cloud generate`, the lossless tests and the benchmarks; the networked path
replaces `InProcessVerifier` with the HTTP client and keeps everything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from wisp_cloud.inprocess import InProcessVerifier
from wisp_cloud.model.loader import load_model
from wisp_cloud.model.transformer import Transformer
from wisp_cloud.settings import DEFAULT_TARGET
from wisp_cloud.tokenizer import chat_template_of, target_token_pieces
from wisp_cloud.verifier import Verifier
from wisp_edge.drafters import load_drafter
from wisp_edge.drafters.base import Drafter
from wisp_edge.engine import DraftPolicy, SpeculativeEngine
from wisp_edge.wire.chat import render_chat
from wisp_edge.wire.paths import DEFAULT_DRAFTER
from wisp_edge.wire.vocab import check_same_vocab, fingerprint


@dataclass
class LocalPair:
    model: Transformer
    target_dir: Path
    drafter: Drafter
    vocab_fingerprint: str

    @classmethod
    def load(cls, drafter: str | Path = DEFAULT_DRAFTER, target_dir: str | Path = DEFAULT_TARGET, *,
             n_threads: int | None = None, dtype: torch.dtype = torch.float32,
             model: Transformer | None = None) -> "LocalPair":
        target_dir = Path(target_dir)
        model = model or load_model(target_dir, dtype=dtype)
        draft = load_drafter(drafter, n_threads=n_threads)
        target_pieces = target_token_pieces(target_dir, model.args.vocab_size)
        check_same_vocab(draft.token_pieces(), target_pieces, drafter_name=f"drafter {draft.name}",
                         target_name=f"target {target_dir}")
        return cls(model, target_dir, draft, fingerprint(target_pieces))

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return tuple(self.model.args.eos_token_ids)

    def engine(self, policy: DraftPolicy | None = None, *, decode_while_prefilling: bool = True,
               draft_ahead: bool = True) -> SpeculativeEngine:
        backend = InProcessVerifier(Verifier(self.model), vocab_fingerprint=self.vocab_fingerprint)
        return SpeculativeEngine(self.drafter, backend, policy, eos_ids=self.eos_ids,
                                 vocab_fingerprint=self.vocab_fingerprint,
                                 decode_while_prefilling=decode_while_prefilling, draft_ahead=draft_ahead)

    def chat_prompt_ids(self, user_text: str, system: str | None = None) -> list[int]:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_text}]
        return self.drafter.tokenize(chat_prompt_text(self.target_dir, messages))


def chat_prompt_text(target_dir: Path, messages: list[dict]) -> str:
    template, bos, eos = chat_template_of(target_dir)
    return render_chat(template, messages, bos_token=bos, eos_token=eos)
