"""The verifier: target-side sessions and batched prefill/verification, one forward per batch.

Each session keeps the committed tokens (the edge's source of truth, mirrored) and a KV cache
holding every committed token but the last: ``cache.length == len(tokens) - 1``. A verify round
feeds ``[last committed token, *draft]`` so row i of the logits judges draft[i], and afterwards
keeps the KV of the last committed token plus the accepted drafts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from wisp_cloud.model.kv_cache import KVCache
from wisp_cloud.model.transformer import RaggedBatch, Transformer, commit
from wisp_cloud.verification import InvalidDraftError, Verdict, dense_q, sample_token, verify_greedy, verify_sampled
from wisp_edge.sampling import SamplingParams


class StalePositionError(ValueError):
    """The block was drafted from a prefix the server does not hold (a lost or repeated round)."""

    def __init__(self, position: int, committed: int) -> None:
        super().__init__(f"block drafted at position {position}, but the server has {committed} committed tokens")
        self.position, self.committed = position, committed


@dataclass
class TargetSession:
    session_id: str
    tokens: list[int]  # committed: prompt + generated
    params: SamplingParams
    cache: KVCache
    generator: torch.Generator = field(default_factory=torch.Generator)

    @property
    def position(self) -> int:
        return len(self.tokens)


class Verifier:
    def __init__(self, model: Transformer, *, max_draft: int = 32) -> None:
        self.model = model
        self.vocab_size = model.args.vocab_size
        self.max_draft = max_draft

    def open(self, session_id: str, prompt_ids: list[int], params: SamplingParams) -> TargetSession:
        """A session with no KV yet; `prefill` must run before its first verify."""
        self._check_ids(prompt_ids, "prompt")
        if not prompt_ids:
            raise InvalidDraftError("the prompt must hold at least one token")
        if len(prompt_ids) >= self.model.args.max_seq_len:
            raise InvalidDraftError(f"prompt of {len(prompt_ids)} tokens exceeds the model's {self.model.args.max_seq_len}")
        generator = torch.Generator()
        generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        cache = self.model.new_cache(capacity=len(prompt_ids) + 64)
        return TargetSession(session_id, list(prompt_ids), params, cache, generator)

    def prefill(self, sessions: list[TargetSession]) -> list[int]:
        """One forward over the sessions' uncached tokens; appends and returns each first target token."""
        for s in sessions:
            s.cache.truncate(0)
        batch = RaggedBatch(torch.tensor([t for s in sessions for t in s.tokens], dtype=torch.long),
                            [len(s.tokens) for s in sessions], [s.cache for s in sessions])
        last_rows = torch.tensor(batch.offsets[1:]) - 1
        logits = self.model(batch, logit_rows=last_rows)  # [sessions, vocab]
        commit(batch, batch.seq_lens)
        firsts = []
        for s, row in zip(sessions, logits):
            token = sample_token(row, s.params, s.generator)
            s.tokens.append(token)
            firsts.append(token)
        return firsts

    def verify(self, blocks: list[tuple[TargetSession, int, list[int], list | None]]) -> list[Verdict]:
        """Verify many sessions' blocks in one forward.  blocks: (session, position, draft ids, sparse q or None)."""
        for session, position, draft, q in blocks:
            self._check_block(session, position, draft, q)
        sessions = [b[0] for b in blocks]
        inputs = [[s.tokens[-1], *draft] for s, _, draft, _ in blocks]
        batch = RaggedBatch(torch.tensor([t for seq in inputs for t in seq], dtype=torch.long),
                            [len(seq) for seq in inputs], [s.cache for s in sessions])
        logits = self.model(batch)  # [num_tokens, vocab]
        verdicts = []
        for i, (session, _, draft, q) in enumerate(blocks):
            rows = logits[batch.offsets[i]: batch.offsets[i + 1]]  # [k+1, vocab]
            if session.params.greedy:
                verdict = verify_greedy(rows, draft)
            else:
                q_rows = [dense_q(sparse, self.vocab_size) for sparse in q]
                verdict = verify_sampled(rows, draft, q_rows, session.params, session.generator)
            session.tokens.extend([*draft[: verdict.accepted], verdict.token])
            verdicts.append(verdict)
        commit(batch, [1 + v.accepted for v in verdicts])
        return verdicts

    def _check_ids(self, ids: list[int], what: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidDraftError(f"{what} token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")

    def _check_block(self, session: TargetSession, position: int, draft: list[int], q: list | None) -> None:
        if position != session.position:
            raise StalePositionError(position, session.position)
        if len(draft) > self.max_draft:
            raise InvalidDraftError(f"draft of {len(draft)} tokens exceeds the limit of {self.max_draft}")
        if session.position + len(draft) >= self.model.args.max_seq_len:
            raise InvalidDraftError(f"session would exceed the model's {self.model.args.max_seq_len} tokens")
        self._check_ids(draft, "draft")
        if not session.params.greedy:
            if q is None or len(q) != len(draft):
                raise InvalidDraftError(f"sampling needs one q per draft token ({len(draft)} drafts, "
                                        f"{0 if q is None else len(q)} q)")
            for offset, (token, (ids, probs)) in enumerate(zip(draft, q)):
                if len(ids) != len(probs) or not ids:
                    raise InvalidDraftError("each q must list as many probabilities as token ids, at least one")
                self._check_ids(ids, "q")
                if any(not 0.0 <= x <= 1.0 for x in probs) or abs(sum(probs) - 1.0) > 1e-3:
                    raise InvalidDraftError(f"q at offset {offset} is not a probability distribution")
                if dict(zip(ids, probs)).get(token, 0.0) <= 0.0:
                    raise InvalidDraftError(f"draft token {token} at offset {offset} has q = 0: "
                                            "it cannot have been sampled from q")
