"""The verifier: target-side sessions and batched prefill/verification, one forward per batch.

Each session keeps the committed tokens (the edge's source of truth, mirrored) and a KV cache
holding every committed token but the last: ``cache.length == len(tokens) - 1``. A verify round
feeds ``[last committed token, *draft]`` so row i of the logits judges draft[i], and afterwards
keeps the KV of the last committed token plus the accepted drafts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wisp_cloud.model.kv_cache import KVCache
from wisp_cloud.model.transformer import RaggedBatch, Transformer, commit
from wisp_cloud.verification import InvalidDraftError, Verdict, dense_q, sample_token, verify_greedy, verify_sampled
from wisp_edge.wire.sampling import SamplingParams


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
    seed: int = 0  # the request's seed, or a random one

    @property
    def position(self) -> int:
        return len(self.tokens)

    def generator_at(self, position: int) -> torch.Generator:
        """The random stream for the round drafted at `position`: a function of (seed, position) only,
        so a round re-sent after a resume or a restart draws the same numbers and, with the same
        draft, gets the same verdict; sampled text is then as reproducible as greedy text."""
        mixed = (self.seed ^ (position * 0x9E3779B97F4A7C15)) & ((1 << 63) - 1)
        return torch.Generator().manual_seed(mixed)


@dataclass
class Prefill:
    """Cache a session's prompt; sample the first target token unless resuming (the edge holds it)."""

    session: TargetSession
    sample_first: bool = True


@dataclass
class Verify:
    """Judge a draft block drafted at `position` (the committed length it was drafted from)."""

    session: TargetSession
    position: int
    draft: list[int]
    q: list | None = None


class Verifier:
    def __init__(self, model: Transformer, *, max_draft: int = 32) -> None:
        self.model = model
        self.vocab_size = model.args.vocab_size
        self.max_draft = max_draft

    def open(self, session_id: str, prompt_ids: list[int], params: SamplingParams,
             cache: KVCache | None = None) -> TargetSession:
        """A session with no KV yet (`cache`: one from a pool, else a fresh one); prefill before verifying."""
        self._check_ids(prompt_ids, "prompt")
        if not prompt_ids:
            raise InvalidDraftError("the prompt must hold at least one token")
        if len(prompt_ids) >= self.model.args.max_seq_len:
            raise InvalidDraftError(f"prompt of {len(prompt_ids)} tokens exceeds the model's "
                                    f"{self.model.args.max_seq_len}")
        seed = params.seed if params.seed is not None else torch.seed()
        cache = cache if cache is not None else self.model.new_cache(capacity=0)
        return TargetSession(session_id, list(prompt_ids), params, cache, seed)

    def prefill(self, sessions: list[TargetSession]) -> list[int]:
        """One forward over the sessions' prompts; appends and returns each first target token."""
        return self.run([Prefill(s) for s in sessions])  # type: ignore[return-value]

    def verify(self, blocks: list[tuple[TargetSession, int, list[int], list | None]]) -> list[Verdict]:
        """Verify many sessions' blocks in one forward.  blocks: (session, position, draft ids, sparse q or None)."""
        return self.run([Verify(*block) for block in blocks])  # type: ignore[return-value]

    def check(self, work: "Prefill | Verify") -> None:
        """Raise InvalidDraftError / StalePositionError for a block the verifier would refuse."""
        if isinstance(work, Verify):
            self._check_block(work.session, work.position, work.draft, work.q)

    def run(self, work: list["Prefill | Verify"]) -> list[int | None | Verdict]:
        """One ragged forward over prefills, resumes and verify blocks of many sessions.

        A prefill feeds the prompt and samples the first target token from its last row (a resume
        feeds all but the last committed token and samples nothing: the edge already holds it); both
        take the leading blocks the prefix cache holds and feed only the rest; a verify feeds [last
        committed token, *draft] and keeps the accepted prefix. Only the logit rows someone reads are
        computed. Returns, per item: the first token, None (resume) or
        the Verdict.
        """
        for item in work:
            self.check(item)
        inputs, feeds = [], []
        for item in work:
            s = item.session
            if isinstance(item, Verify):
                seq = [s.tokens[-1], *item.draft]
            else:  # prefill or resume: start from the prefix cache, compute only the rest
                seq = s.tokens if item.sample_first else s.tokens[:-1]
                s.cache.reset()
                seq = seq[s.cache.reuse_prefix(seq, keep_last=item.sample_first):]
            if seq:
                inputs.append(seq)
                feeds.append(item)
        results: dict[int, int | None | Verdict] = {id(item): None for item in work}
        if inputs:
            batch = RaggedBatch(torch.tensor([t for seq in inputs for t in seq], dtype=torch.long),
                                [len(seq) for seq in inputs], [item.session.cache for item in feeds])
            rows: list[int] = []
            spans = []  # where each item's rows sit in the logits
            for i, item in enumerate(feeds):
                start, end = batch.offsets[i], batch.offsets[i + 1]
                if isinstance(item, Verify):
                    spans.append((len(rows), end - start))
                    rows.extend(range(start, end))
                elif item.sample_first:
                    spans.append((len(rows), 1))
                    rows.append(end - 1)
                else:
                    spans.append((len(rows), 0))
            # Sampling and acceptance run on the CPU: a few rows, and CPU generators stay valid.
            logits = self.model(batch, logit_rows=torch.tensor(rows, dtype=torch.long)).cpu()
            kept = []
            for item, (first_row, n_rows), n_fed in zip(feeds, spans, batch.seq_lens):
                s = item.session
                if isinstance(item, Verify):
                    rows_i = logits[first_row: first_row + n_rows]  # [k+1, vocab]
                    if s.params.greedy:
                        verdict = verify_greedy(rows_i, item.draft)
                    else:
                        q_rows = [dense_q(sparse, self.vocab_size) for sparse in item.q]
                        verdict = verify_sampled(rows_i, item.draft, q_rows, s.params,
                                                 s.generator_at(item.position))
                    s.tokens.extend([*item.draft[: verdict.accepted], verdict.token])
                    results[id(item)] = verdict
                    kept.append(1 + verdict.accepted)
                else:
                    if item.sample_first:
                        token = sample_token(logits[first_row], s.params, s.generator_at(s.position))
                        s.tokens.append(token)
                        results[id(item)] = token
                    kept.append(n_fed)
            commit(batch, kept)
        return [results[id(item)] for item in work]

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
