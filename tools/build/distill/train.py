"""Student init from target layers and distillation training (checkpointed, resumable).

The student keeps the target's width, its tied embedding / LM head (frozen, shared, so it costs
the student nothing to ship) and a few target layers chosen by index; its FFN may be pruned to fit
the parameter budget. Teacher shards give, per position, the teacher's final hidden h_T, so the
loss never needs the full 49k-wide LM head:
  * KL(teacher || student) and hard CE on the teacher's greedy token, both over a candidate set
    (every teacher top-k token in the batch plus random negatives);
  * full-vocabulary logit MSE, computed exactly as d^T G d with G = Ec^T Ec / V (576 x 576), where
    d = h_S - h_T and Ec the mean-centred embedding: this catches logits outside the candidates.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from wisp_cloud.model.config import ModelArgs
from wisp_cloud.model.transformer import Transformer, rope_inv_freq, rotate_half


def student_args(target: ModelArgs, n_layers: int, ffn_dim: int | None = None) -> ModelArgs:
    return replace(target, n_layers=n_layers, ffn_dim=ffn_dim or target.ffn_dim)


@torch.no_grad()
def ffn_activation_norms(target: Transformer, calib: list[torch.Tensor]) -> list[torch.Tensor]:
    """Mean |silu(gate) * up| per FFN neuron and layer ([ffn_dim] each) over calibration sequences.

    Weight norms alone are a bad importance score here: a few small-weight neurons carry huge
    activations that the whole network relies on, and pruning them destroys the model.
    """
    sums = [torch.zeros(target.args.ffn_dim) for _ in target.layers]
    count = [0]

    def hook(i):
        def fn(mod, inp, out):
            x = inp[0]
            sums[i].add_((F.silu(mod.gate_proj(x)) * mod.up_proj(x)).abs().reshape(-1, sums[i].shape[0]).sum(0))
        return fn

    handles = [layer.mlp.register_forward_hook(hook(i)) for i, layer in enumerate(target.layers)]
    try:
        for ids in calib:
            hidden_forward(target, ids.long()[None])
            count[0] += len(ids)
    finally:
        for h in handles:
            h.remove()
    return [s / max(count[0], 1) for s in sums]


def init_student(target: Transformer, layers: list[int], ffn_dim: int | None = None,
                 calib: list[torch.Tensor] | None = None) -> Transformer:
    """Copy the chosen target layers (FFN pruned to the `ffn_dim` most important neurons) into a student."""
    args = student_args(target.args, len(layers), ffn_dim)
    act = ffn_activation_norms(target, calib) if calib and args.ffn_dim < target.args.ffn_dim else None
    student = Transformer(args)
    student.embed_tokens.weight.data.copy_(target.embed_tokens.weight.data)
    student.norm.weight.data.copy_(target.norm.weight.data)
    for dst, src_i in zip(student.layers, layers):
        src = target.layers[src_i]
        sd = {k: v.clone() for k, v in src.state_dict().items()}
        if args.ffn_dim < target.args.ffn_dim:
            m = src.mlp  # fallback importance of hidden neuron j: |down[:, j]| * |up[j]| * |gate[j]|
            score = m.down_proj.weight.norm(dim=0) * m.up_proj.weight.norm(dim=1) * m.gate_proj.weight.norm(dim=1)
            if act is not None:  # expected |output| contribution of neuron j
                score = m.down_proj.weight.norm(dim=0) * act[src_i]
            keep = score.topk(args.ffn_dim).indices.sort().values
            sd["mlp.gate_proj.weight"] = sd["mlp.gate_proj.weight"][keep]
            sd["mlp.up_proj.weight"] = sd["mlp.up_proj.weight"][keep]
            sd["mlp.down_proj.weight"] = sd["mlp.down_proj.weight"][:, keep]
        dst.load_state_dict(sd)
    student.embed_tokens.weight.requires_grad_(False)  # shared with the target, tied to lm_head
    student.inv_freq = rope_inv_freq(args)
    return student


def count_params(model: Transformer) -> int:
    """Total parameters, a tied embedding counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def own_state(model: Transformer) -> dict[str, torch.Tensor]:
    """The student's own weights in HF naming (everything except the shared, frozen embedding)."""
    return {f"model.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()
            if k not in ("embed_tokens.weight", "lm_head.weight")}


def hf_config(target_config: dict, args: ModelArgs) -> dict:
    cfg = dict(target_config)
    cfg.update(num_hidden_layers=args.n_layers, intermediate_size=args.ffn_dim, tie_word_embeddings=True,
               architectures=["LlamaForCausalLM"], torch_dtype="float32")
    return cfg


def hidden_forward(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Final normed hidden states [B, T, dim] for right-padded tokens [B, T] (causal, with autograd)."""
    a = model.args
    b, t = tokens.shape
    pos = torch.arange(t, device=tokens.device)
    freqs = pos[:, None].float() * model.inv_freq[None, :]  # [T, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()  # [T, head_dim]
    x = model.embed_tokens(tokens)  # [B, T, dim]
    for layer in model.layers:
        at = layer.self_attn
        h = layer.input_layernorm(x)
        q = at.q_proj(h).view(b, t, a.n_heads, a.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = at.k_proj(h).view(b, t, a.n_kv_heads, a.head_dim).transpose(1, 2)  # [B, KV, T, hd]
        v = at.v_proj(h).view(b, t, a.n_kv_heads, a.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=a.n_heads != a.n_kv_heads)
        x = x + at.o_proj(o.transpose(1, 2).reshape(b, t, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.norm(x)


# ----------------------------------------------------------------------------------------- data

def make_examples(records: list[dict], prompt_weight: float) -> list[dict]:
    """Per record: input ids [L-1], teacher top-k ids [L-1, k], teacher hidden [L-1, d], weights [L-1]."""
    out = []
    for r in records:
        n = len(r["ids"]) - 1
        w = torch.full((n,), prompt_weight)
        w[r["n_prompt"] - 1:] = 1.0  # answer positions (the first predicts the first answer token)
        out.append(dict(ids=r["ids"][:-1].long(), top=r["top_ids"].long(), hid=r["hidden"], w=w))
    return out


def batches(examples: list[dict], max_tokens: int, rng: random.Random):
    """Endless shuffled batches of similar-length examples, at most `max_tokens` padded tokens each."""
    while True:
        order = sorted(range(len(examples)), key=lambda i: (len(examples[i]["ids"]), rng.random()))
        groups, cur = [], []
        for i in order:
            if cur and (len(cur) + 1) * len(examples[i]["ids"]) > max_tokens:
                groups.append(cur)
                cur = []
            cur.append(i)
        groups.append(cur)
        rng.shuffle(groups)
        for g in groups:
            yield [examples[i] for i in g]


def collate(group: list[dict]):
    t = max(len(e["ids"]) for e in group)
    b, k, d = len(group), group[0]["top"].shape[1], group[0]["hid"].shape[1]
    ids = torch.full((b, t), 2, dtype=torch.long)  # [B, T]
    top = torch.zeros((b, t, k), dtype=torch.long)  # [B, T, k]
    hid = torch.zeros((b, t, d))  # [B, T, d]
    w = torch.zeros((b, t))  # [B, T], 0 on padding
    for i, e in enumerate(group):
        n = len(e["ids"])
        ids[i, :n], top[i, :n], hid[i, :n], w[i, :n] = e["ids"], e["top"], e["hid"].float(), e["w"]
    return ids, top, hid, w


# ----------------------------------------------------------------------------------------- loss

def centred_gram(embed: torch.Tensor) -> torch.Tensor:
    ec = embed - embed.mean(0, keepdim=True)  # [V, d]
    return ec.T @ ec / embed.shape[0]  # [d, d]


def distill_loss(model: Transformer, ids, top, hid_t, w, gram, *, n_neg: int = 1024, kl_w: float = 1.0,
                 ce_w: float = 0.5, mse_w: float = 0.05, gen: torch.Generator | None = None):
    h_s = hidden_forward(model, ids)  # [B, T, d]
    sel = w > 0
    h_s, h_t, top, w = h_s[sel], hid_t[sel], top[sel], w[sel]  # [N, d], [N, d], [N, k], [N]
    embed = model.embed_tokens.weight  # [V, d] frozen
    neg = torch.randint(0, embed.shape[0], (n_neg,), generator=gen)
    cand, inv = torch.unique(torch.cat([top.reshape(-1), neg]), return_inverse=True)  # [C]
    label = inv[: top.numel()].view(top.shape)[:, 0]  # [N] index of the teacher's greedy token in cand
    e_c = embed[cand]  # [C, d]
    z_s = h_s @ e_c.T  # [N, C]
    z_t = h_t @ e_c.T
    logp_s = z_s.log_softmax(-1)
    p_t = z_t.softmax(-1)
    kl = (p_t * (p_t.clamp_min(1e-12).log() - logp_s)).sum(-1)  # [N]
    ce = F.nll_loss(logp_s, label, reduction="none")  # [N]
    diff = h_s - h_t
    mse = ((diff @ gram) * diff).sum(-1)  # [N] mean squared centred-logit error over the full vocab
    wsum = w.sum()
    loss = ((kl_w * kl + ce_w * ce + mse_w * mse) * w).sum() / wsum
    kl, ce, mse = kl.detach(), ce.detach(), mse.detach()
    stats = dict(kl=float((kl * w).sum() / wsum), ce=float((ce * w).sum() / wsum), mse=float((mse * w).sum() / wsum),
                 acc=float(((z_s.argmax(-1) == label).float() * (w == 1)).sum() / (w == 1).sum().clamp_min(1)))
    return loss, stats


# ----------------------------------------------------------------------------------------- outputs

def save_student_files(model: Transformer, target_config: dict, out_dir: Path, dtype: torch.dtype | None = None
                       ) -> dict[str, str]:
    """Write config.json and student_layers.safetensors (fp32 if <= 60 MB, else fp16); returns paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = own_state(model)
    nbytes = sum(v.numel() * 4 for v in state.values())
    dtype = dtype or (torch.float32 if nbytes <= 60e6 else torch.float16)
    save_file({k: v.to(dtype) for k, v in state.items()}, str(out_dir / "student_layers.safetensors"),
              metadata={"format": "pt", "shared_embedding": "model.embed_tokens.weight from models/target"})
    (out_dir / "config.json").write_text(json.dumps(hf_config(target_config, model.args), indent=2) + "\n")
    return {"config": str(out_dir / "config.json"), "weights": str(out_dir / "student_layers.safetensors")}


def lr_at(frac: float, base: float, warmup_frac: float = 0.03, floor: float = 0.1) -> float:
    if frac < warmup_frac:
        return base * max(frac / warmup_frac, 0.02)
    p = min(1.0, (frac - warmup_frac) / (1 - warmup_frac))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def train(model: Transformer, examples: list[dict], ckpt_path: Path, *, minutes: float | None, tokens: int | None,
          lr: float = 5e-4, max_tokens: int = 2048, seed: int = 0, eval_fn=None, eval_every_min: float = 8.0,
          on_improve=None, log=print, progress=None, eval_first: bool = False,
          loss_weights: dict | None = None) -> dict:
    """Train until the minute or token budget (whichever first); resumes from `ckpt_path` if present.

    eval_first: evaluate before the first step, so a run continued from a good student only saves
    (on_improve) weights that beat where it started.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    state = dict(step=0, tokens=0, elapsed=0.0, best=-1.0, history=[])
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ck["model"], strict=False)
        opt.load_state_dict(ck["opt"])
        state = ck["state"]
        log(f"train: resumed at step {state['step']}, {state['tokens']} tokens, {state['elapsed'] / 60:.1f} min")
    rng = random.Random(seed + state["step"])
    gen = torch.Generator().manual_seed(seed + state["step"])
    gram = centred_gram(model.embed_tokens.weight.detach())
    it = batches(examples, max_tokens, rng)
    budget_s = None if minutes is None else 60 * minutes
    t_start, last_eval, last_ckpt = time.time() - state["elapsed"], time.time(), time.time()
    avg: dict[str, float] = {}

    def frac() -> float:
        fs = [state["elapsed"] / budget_s if budget_s else 0.0, state["tokens"] / tokens if tokens else 0.0]
        return max(fs)

    def checkpoint() -> None:
        torch.save(dict(model={k: v for k, v in model.state_dict().items() if k != "embed_tokens.weight"},
                        opt=opt.state_dict(), state=state), ckpt_path.with_suffix(".tmp"))
        ckpt_path.with_suffix(".tmp").replace(ckpt_path)

    def evaluate_now() -> None:
        if eval_fn is None:
            return
        model.eval()
        with torch.no_grad():
            agree = eval_fn(model)
        model.train()
        state["history"].append(dict(step=state["step"], tokens=state["tokens"], minutes=state["elapsed"] / 60,
                                     agreement=agree))
        log(f"eval: step {state['step']} tokens {state['tokens']} agreement {agree:.4f} (best {state['best']:.4f})")
        if agree > state["best"]:
            state["best"] = agree
            if on_improve is not None:
                on_improve(model, agree, dict(state))

    if eval_first and state["step"] == 0:
        evaluate_now()
    model.train()
    while frac() < 1.0:
        group = next(it)
        ids, top, hid, w = collate(group)
        for g in opt.param_groups:
            g["lr"] = lr_at(frac(), lr)
        loss, stats = distill_loss(model, ids, top, hid, w, gram, gen=gen, **(loss_weights or {}))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        state["step"] += 1
        state["tokens"] += int((w > 0).sum())
        state["elapsed"] = time.time() - t_start
        for k, v in stats.items():
            avg[k] = v if k not in avg else 0.98 * avg[k] + 0.02 * v
        if progress is not None:
            progress(state, avg)
        if time.time() - last_ckpt > 120:
            checkpoint()
            last_ckpt = time.time()
        if time.time() - last_eval > 60 * eval_every_min:
            evaluate_now()
            last_eval = time.time()
            t_start = time.time() - state["elapsed"]  # evaluation time does not count as training time
    evaluate_now()
    checkpoint()
    return state


def load_student(student_dir: Path, target_dir: Path) -> Transformer:
    """The student from its committed files plus the target's embedding (fp32, eval mode)."""
    from safetensors.torch import load_file

    args = ModelArgs.from_hf_config(json.loads((student_dir / "config.json").read_text()))
    model = Transformer(args)
    state = {k.removeprefix("model."): v.float() for k, v in load_file(str(student_dir / "student_layers.safetensors")).items()}
    from safetensors import safe_open
    with safe_open(str(target_dir / "model.safetensors"), framework="pt") as f:
        state["embed_tokens.weight"] = f.get_tensor("model.embed_tokens.weight").float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(args)
    return model.eval()


def assemble(student_dir: Path, target_dir: Path, out_dir: Path) -> Path:
    """A full HF checkpoint (embedding added back, tokenizer copied) loadable by load_model and transformers."""
    import shutil

    model = load_student(student_dir, target_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(student_dir / "config.json", out_dir / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                 "special_tokens_map.json"):
        if (target_dir / name).exists():
            shutil.copy(target_dir / name, out_dir / name)
    return out_dir
