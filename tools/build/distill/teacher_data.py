"""Resumable teacher data: the target's greedy answers with its top-k logits and final hidden states.

We generate with the compact ragged transformer and *continuous batching*: each forward packs
whole new prompts (prefill) together with one token for every live answer, so the batch stays
full and the prompt positions yield teacher-forced soft labels for free. For every fed position we
keep the teacher's top-k logits (the greedy token is top-1) and its final normed hidden state h,
from which the student's trainer recovers the teacher logit of any token as E[tok] . h.

Shards (`shard_XXXXX.pt`) are written atomically; a rerun skips prompts already in a shard.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from wisp_cloud.model.transformer import RaggedBatch, Transformer, commit


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def done_indices(out_dir: Path) -> set[int]:
    done: set[int] = set()
    for shard in sorted(out_dir.glob("shard_*.pt")):
        done.update(r["prompt_index"] for r in torch.load(shard, weights_only=False))
    return done


def load_shards(out_dir: Path) -> list[dict]:
    records = []
    for shard in sorted(Path(out_dir).glob("shard_*.pt")):
        records += torch.load(shard, weights_only=False)
    return records


def count_tokens(out_dir: Path) -> tuple[int, int]:
    """(answer tokens, all fed positions) over every shard (reads the small int tensors only)."""
    ans = fed = 0
    for r in load_shards(out_dir):
        ans += len(r["ids"]) - r["n_prompt"]
        fed += len(r["ids"]) - 1
    return ans, fed


@torch.no_grad()
def generate(model: Transformer, prompt_ids: list[list[int]], out_dir: str | Path, *, eos_ids: list[int],
             max_new: int = 128, batch: int = 32, topk: int = 8, keep_hidden: bool = True,
             shard_size: int = 64, minutes: float | None = None, max_prefill: int = 768,
             log=print) -> None:
    """Greedy-answer every prompt (index i of `prompt_ids`) not already in a shard of `out_dir`.

    Record per prompt: ids [L] int32 (prompt + answer), n_prompt, prompt_index, and for the L-1
    fed positions: top_ids [L-1, k] int32, top_logits [L-1, k] fp16, hidden [L-1, dim] fp16.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = done_indices(out_dir)
    todo = [i for i in range(len(prompt_ids)) if i not in done]
    next_shard = len(list(out_dir.glob("shard_*.pt")))
    deadline = None if minutes is None else time.time() + 60 * minutes
    captured: dict[str, torch.Tensor] = {}
    hook = model.norm.register_forward_hook(lambda m, i, o: captured.__setitem__("h", o))
    live: list[dict] = []
    finished: list[dict] = []
    bar = tqdm(total=len(todo), desc="teacher", unit="prompt", mininterval=30)
    new_tokens, t0 = 0, time.time()
    try:
        while todo or live:
            if deadline is not None and time.time() > deadline:
                log(f"teacher: time budget reached, {len(live)} in-flight answers dropped")
                break
            feeds, admitted = [], 0
            while todo and len(live) < batch and admitted < max_prefill:
                i = todo.pop(0)
                ids = list(prompt_ids[i])
                live.append(dict(prompt_index=i, ids=ids, n_prompt=len(ids), cache=model.new_cache(len(ids) + max_new),
                                 top_ids=[], top_logits=[], hidden=[], pending=ids))
                admitted += len(ids)
            for s in live:
                feeds.append(s["pending"])
            rb = RaggedBatch(torch.tensor([t for f in feeds for t in f], dtype=torch.long), [len(f) for f in feeds],
                             [s["cache"] for s in live])
            logits = model(rb)  # [num_tokens, vocab]
            commit(rb, rb.seq_lens)
            vals, idx = logits.topk(topk, dim=-1)  # [num_tokens, k]
            hid = captured["h"]  # [num_tokens, dim]
            still = []
            for n, s in enumerate(live):
                lo, hi = rb.offsets[n], rb.offsets[n + 1]
                s["top_ids"].append(idx[lo:hi].int())
                s["top_logits"].append(vals[lo:hi].half())
                if keep_hidden:
                    s["hidden"].append(hid[lo:hi].half())
                nxt = int(idx[hi - 1, 0])
                s["ids"].append(nxt)
                s["pending"] = [nxt]
                new_tokens += 1
                if nxt in eos_ids or len(s["ids"]) - s["n_prompt"] >= max_new:
                    finished.append(dict(prompt_index=s["prompt_index"], n_prompt=s["n_prompt"],
                                         ids=torch.tensor(s["ids"], dtype=torch.int32),
                                         top_ids=torch.cat(s["top_ids"]), top_logits=torch.cat(s["top_logits"]),
                                         hidden=torch.cat(s["hidden"]) if keep_hidden else None))
                    bar.update(1)
                else:
                    still.append(s)
            live = still
            if len(finished) >= shard_size or (not todo and not live and finished):
                _save_atomic(finished, out_dir / f"shard_{next_shard:05d}.pt")
                next_shard += 1
                finished = []
                rate = new_tokens / (time.time() - t0)
                log(f"teacher: shard {next_shard} saved, {new_tokens} answer tokens this run ({rate:.1f} tok/s)")
    finally:
        hook.remove()
        if finished:
            _save_atomic(finished, out_dir / f"shard_{next_shard:05d}.pt")
        bar.close()
