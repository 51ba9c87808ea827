"""Held-out agreement and exact greedy speculative-decoding acceptance from a match vector.

Agreement is teacher-forced on the target's own greedy answers: match[i] says whether the
student's argmax at answer position i equals the target's token. For greedy verification this
vector fully determines speculative decoding: a round starting at answer position j drafts up to k
tokens, accepts a = the number of consecutive matches from j (capped at k and at the end), and
the next round starts at j + a + 1 (the target supplies the correction, or bonus, token).
"""

from __future__ import annotations

import torch

from tools.build.distill.train import hidden_forward
from wisp_cloud.model.transformer import Transformer


def acceptance(matches: list[list[bool]], k: int) -> dict[str, float]:
    """Greedy speculative decoding with draft length k over each sequence's match vector.

    Returns rounds, drafted and accepted token counts, acceptance_rate (accepted / drafted),
    mean_accepted (accepted per round) and tokens_per_round (accepted + the target's token).
    """
    rounds = drafted = accepted = produced = 0
    for m in matches:
        n, j = len(m), 0
        while j < n:
            cap = min(k, n - j)
            a = 0
            while a < cap and m[j + a]:
                a += 1
            rounds += 1
            drafted += cap
            accepted += a
            produced += a + (1 if j + a < n else 0)
            j += a + 1
    return dict(rounds=rounds, drafted=drafted, accepted=accepted,
                acceptance_rate=accepted / max(drafted, 1), mean_accepted=accepted / max(rounds, 1),
                tokens_per_round=produced / max(rounds, 1))


@torch.no_grad()
def match_vectors(model: Transformer, records: list[dict], batch_tokens: int = 4096) -> list[list[bool]]:
    """Teacher-forced: for each record, student argmax == target token at every answer position."""
    embed = model.lm_head.weight  # [V, d]
    order = sorted(range(len(records)), key=lambda i: len(records[i]["ids"]))
    out: list[list[bool]] = [[] for _ in records]
    i = 0
    while i < len(order):
        t = len(records[order[i]]["ids"]) - 1
        group = [order[i]]
        while i + len(group) < len(order):
            nxt = order[i + len(group)]
            if (len(group) + 1) * (len(records[nxt]["ids"]) - 1) > batch_tokens:
                break
            group.append(nxt)
        t = max(len(records[g]["ids"]) - 1 for g in group)
        ids = torch.full((len(group), t), 2, dtype=torch.long)  # [B, T]
        for r, g in enumerate(group):
            x = records[g]["ids"][:-1].long()
            ids[r, : len(x)] = x
        h = hidden_forward(model, ids)  # [B, T, d]
        for r, g in enumerate(group):
            rec = records[g]
            p0, n = rec["n_prompt"], len(rec["ids"])
            pred = (h[r, p0 - 1: n - 1] @ embed.T).argmax(-1)  # [answer_len]
            out[g] = (pred == rec["ids"][p0:n].long()).tolist()
        i += len(group)
    return out


def agreement(matches: list[list[bool]]) -> float:
    total = sum(len(m) for m in matches)
    return sum(sum(m) for m in matches) / max(total, 1)


def report(matches: list[list[bool]], ks=range(1, 9)) -> dict:
    return dict(agreement=agreement(matches), answer_tokens=sum(len(m) for m in matches), sequences=len(matches),
                acceptance={str(k): acceptance(matches, k) for k in ks})
