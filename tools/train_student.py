#!/usr/bin/env python3
"""Distil the student drafter from the target: teacher data, training, evaluation, assembly.

  python tools/train_student.py all --threads 1 --data-minutes 50 --train-minutes 50
Every step resumes by default (teacher shards and the training checkpoint live in models/student/work/).
Held-out prompts come in two splits: validation (heldout_prompts.jsonl) chooses the checkpoint, test
(test_prompts.jsonl, other held-out source texts) is only reported by `eval`. To train on from the
committed student with fresh prompts: `data --split train --skip-prompts N`, then `train --init-from models/student`.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.build.convert.shipped_pair import sha256  # noqa: E402
from tools.build.distill import evaluate as ev  # noqa: E402
from tools.build.distill import prompts as pr  # noqa: E402
from tools.build.distill import teacher_data as td  # noqa: E402
from tools.build.distill import train as tr  # noqa: E402
from wisp_cloud.model.loader import load_model  # noqa: E402
from wisp_cloud.settings import DEFAULT_TARGET  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def paths(a):
    out, work = Path(a.out), Path(a.work or Path(a.out) / "work")
    teacher = Path(a.teacher) if getattr(a, "teacher", None) else work / "teacher"
    return out, work, teacher, work / "heldout", work / "train_ckpt.pt"


def tokenizer(a):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(a.target)


def test_prompts(all_prompts: list, held_p: list, n: int, seed: int) -> list:
    """The test split: held-out-class prompts whose source text is not in the validation split.

    Validation (heldout_prompts.jsonl) chooses checkpoints; the test split is only ever reported.
    """
    val_hashes = {p.text_hash for p in held_p}
    pool = sorted((p for p in all_prompts if pr.is_heldout(p) and p.text_hash not in val_hashes), key=lambda p: p.id)
    random.Random(seed + 1).shuffle(pool)
    return sorted(pool[:n], key=lambda p: p.id)


def cmd_data(a) -> None:
    out, work, teacher_dir, heldout_dir, _ = paths(a)
    all_p = pr.build_prompts()
    train_p, held_p = pr.split_prompts(all_p, n_heldout=a.heldout, seed=a.seed)
    held_path, test_path = out / "heldout_prompts.jsonl", out / "test_prompts.jsonl"
    if not held_path.exists():
        pr.write_jsonl(held_p, held_path)
    held_p = pr.read_jsonl(held_path)
    if not test_path.exists():
        pr.write_jsonl(test_prompts(all_p, held_p, a.test, a.seed), test_path)
    test_p = pr.read_jsonl(test_path)
    held_hashes = {p.text_hash for p in held_p + test_p}
    train_p = [p for p in train_p if p.text_hash not in held_hashes]
    log(f"prompts: {len(train_p)} train, {len(held_p)} validation, {len(test_p)} test")
    tok = tokenizer(a)
    target = load_model(a.target)
    eos = target.args.eos_token_ids or [2]
    t0 = time.time()
    if a.split in ("eval", "all"):
        for ps, d in ((held_p, heldout_dir), (test_p, work / "test")):
            td.generate(target, [pr.chat_ids(tok, p.prompt)[: a.max_prompt] for p in ps], d, eos_ids=eos,
                        max_new=a.max_new, batch=a.batch, keep_hidden=False, log=log)
    if a.split == "eval":
        return
    left = None if a.minutes is None else max(0.0, a.minutes - (time.time() - t0) / 60)
    train_p = train_p[a.skip_prompts:]
    train_p = train_p[: a.max_prompts] if a.max_prompts else train_p
    td.generate(target, [pr.chat_ids(tok, p.prompt)[: a.max_prompt] for p in train_p], teacher_dir, eos_ids=eos,
                max_new=a.max_new, batch=a.batch, topk=a.topk, minutes=left, log=log)
    ans, fed = td.count_tokens(teacher_dir)
    log(f"teacher data: {ans} answer tokens, {fed} fed positions in {teacher_dir}")
    info_path = work / "data_info.json"
    runs = json.loads(info_path.read_text())["runs"] if info_path.exists() else []
    runs.append(dict(command=a.command_line, seed=a.seed, minutes=round((time.time() - t0) / 60, 1),
                     finished=time.strftime("%Y-%m-%d %H:%M:%S")))
    info_path.write_text(json.dumps(dict(runs=runs, answer_tokens=ans, fed_positions=fed), indent=2) + "\n")


def write_manifest(a, model, report: dict, extra: dict, test: dict | None = None) -> None:
    out, work, teacher_dir, _, _ = paths(a)
    files = {}
    for name in ("config.json", "student_layers.safetensors", "heldout_prompts.jsonl", "test_prompts.jsonl"):
        p = out / name
        if p.exists():
            files[name] = dict(sha256=sha256(p), bytes=p.stat().st_size)
    total = tr.count_params(model)
    embed = model.embed_tokens.weight.numel()
    manifest = dict(
        files=files,
        architecture=dict(model_type="llama", layers=model.args.n_layers, dim=model.args.dim,
                          ffn_dim=model.args.ffn_dim, heads=model.args.n_heads, kv_heads=model.args.n_kv_heads,
                          init_from_target_layers=a.layers, tied_embedding="shared with models/target (frozen)"),
        parameters=dict(total=total, own=total - embed, shared_embedding=embed),
        made_by=dict(command=a.command_line, seed=a.seed, **extra),
        teacher_data=json.loads((work / "data_info.json").read_text()) if (work / "data_info.json").exists() else None,
        heldout_eval=report,  # the validation split (heldout_prompts.jsonl): it chose the checkpoint
        test_eval=test,  # the test split (test_prompts.jsonl): reported only
    )
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def cmd_train(a) -> None:
    out, work, teacher_dir, heldout_dir, ckpt = paths(a)
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    target = load_model(a.target)
    target_cfg = json.loads((Path(a.target) / "config.json").read_text())
    layers = [int(x) for x in a.layers.split(",")]
    records = td.load_shards(teacher_dir)
    if a.init_from:  # continue from a committed student (fresh optimizer and schedule)
        model = tr.load_student(Path(a.init_from), Path(a.target)).train()
        model.embed_tokens.weight.requires_grad_(False)
        arch = json.loads((Path(a.init_from) / "manifest.json").read_text())["architecture"]
        a.layers = arch["init_from_target_layers"]
        layers = [int(x) for x in a.layers.split(",")]
    else:
        calib = [r["ids"] for r in records[: a.calib]]  # FFN-pruning statistics (training data only)
        model = tr.init_student(target, layers, a.ffn, calib=calib)
    del target
    n_params = tr.count_params(model)
    log(f"student: layers {layers} ffn {model.args.ffn_dim}: {n_params / 1e6:.2f}M params "
        f"({(n_params - model.embed_tokens.weight.numel()) / 1e6:.2f}M own)")
    held = td.load_shards(heldout_dir)
    held_eval = held[: a.eval_subset] if a.eval_subset else held
    ans, fed = sum(len(r["ids"]) - r["n_prompt"] for r in records), sum(len(r["ids"]) - 1 for r in records)
    log(f"data: {len(records)} sequences, {ans} answer tokens, {fed} positions; held-out {len(held)} sequences")
    examples = tr.make_examples(records, a.prompt_weight)
    del records
    data_info = dict(train_sequences=len(examples), answer_tokens=ans, fed_positions=fed,
                     validation_sequences=len(held), layers=layers, ffn_dim=model.args.ffn_dim, lr=a.lr,
                     init_from=a.init_from or "target layers", kl_w=a.kl_w, ce_w=a.ce_w, mse_w=a.mse_w)

    last_matches = []

    def eval_fn(m):
        last_matches[:] = ev.match_vectors(m, held_eval)
        return ev.agreement(last_matches)

    def on_improve(m, agree, state):
        tr.save_student_files(m, target_cfg, out)
        report = ev.report(last_matches)
        report["note"] = f"{len(held_eval)} of {len(held)} validation sequences (periodic eval)"
        write_manifest(a, m, report, dict(data=data_info, train=dict(steps=state["step"], tokens=state["tokens"],
                                                                     minutes=round(state["elapsed"] / 60, 1)),
                                          note="written during training at a new best held-out agreement"))
        log(f"saved student ({agree:.4f}); acceptance k=4 mean accepted "
            f"{report['acceptance']['4']['mean_accepted']:.3f}")

    last = [0.0]

    def progress(state, avg):
        if time.time() - last[0] > a.log_every:
            last[0] = time.time()
            log(f"step {state['step']} tok {state['tokens']} {state['elapsed'] / 60:.1f}min "
                + " ".join(f"{k} {v:.3f}" for k, v in avg.items())
                + f" ({state['tokens'] / max(state['elapsed'], 1):.0f} tok/s)")

    state = tr.train(model, examples, ckpt, minutes=a.minutes, tokens=a.tokens, lr=a.lr, max_tokens=a.batch_tokens,
                     seed=a.seed, eval_fn=eval_fn if held else None, eval_every_min=a.eval_every,
                     on_improve=on_improve, log=log, progress=progress, eval_first=bool(a.init_from),
                     loss_weights=dict(kl_w=a.kl_w, ce_w=a.ce_w, mse_w=a.mse_w))
    log(f"train: done, {state['step']} steps, {state['tokens']} tokens, best agreement {state['best']:.4f}")


def cmd_assemble(a) -> None:
    out = Path(a.out)
    hf = tr.assemble(out, Path(a.target), out / "hf")
    log(f"assembled {hf}")


def split_report(model, records: list[dict], name: str, prompts: list | None = None) -> dict:
    """Agreement and acceptance per k; with the split's prompts also agreement per prompt source."""
    matches = ev.match_vectors(model, records)
    report = ev.report(matches)
    report["sequences"] = len(records)
    if prompts is not None:  # record prompt_index is the prompt's line in the split's jsonl
        by: dict[str, list] = {}
        for r, m in zip(records, matches):
            by.setdefault(prompts[r["prompt_index"]].source, []).append(m)
        report["agreement_by_source"] = {k: dict(agreement=ev.agreement(v), sequences=len(v))
                                         for k, v in sorted(by.items())}
    log(f"{name} agreement {report['agreement']:.4f} on {report['answer_tokens']} answer tokens")
    for k, r in report["acceptance"].items():
        log(f"  k={k}: acceptance rate {r['acceptance_rate']:.3f}, mean accepted {r['mean_accepted']:.3f}, "
            f"tokens/round {r['tokens_per_round']:.3f}")
    return report


def cmd_eval(a) -> None:
    """Agreement and tokens per round per k on the validation and the test split (the shipped checkpoint)."""
    out, work, teacher_dir, heldout_dir, ckpt = paths(a)
    cmd_assemble(a)  # from the current weights: a stale hf/ from older weights must not be evaluated
    model = load_model(out / "hf")  # the assembled checkpoint, exactly what ships
    model.inv_freq = model.inv_freq.float()
    reports = {"validation": split_report(model, td.load_shards(heldout_dir), "validation",
                                          pr.read_jsonl(out / "heldout_prompts.jsonl"))}
    if (work / "test").is_dir():
        test_path = out / "test_prompts.jsonl"
        reports["test"] = split_report(model, td.load_shards(work / "test"), "test",
                                       pr.read_jsonl(test_path) if test_path.exists() else None)
    if a.results:
        Path(a.results).parent.mkdir(parents=True, exist_ok=True)
        Path(a.results).write_text(json.dumps(dict(command=a.command_line, student=str(out), sha256=dict(
            weights=sha256(out / "student_layers.safetensors")), **reports), indent=2) + "\n")
        log(f"wrote {a.results}")
    if a.no_manifest:
        return
    manifest_path = out / "manifest.json"
    extra = json.loads(manifest_path.read_text())["made_by"] if manifest_path.exists() else {}
    if "command" in extra:
        extra["train_command"] = extra.pop("command")
    extra.pop("seed", None)
    extra["note"] = "final: evaluated on the assembled checkpoint models/student/hf"
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=False)["state"]
        extra["train"] = dict(steps=st["step"], tokens=st["tokens"], minutes=round(st["elapsed"] / 60, 1),
                              history=st["history"])
        if st["history"]:  # the committed weights are the best periodic evaluation, not the last step
            best = max(st["history"], key=lambda h: h["agreement"])
            extra["shipped_weights"] = dict(step=best["step"], tokens=best["tokens"],
                                            train_minutes=round(best["minutes"], 1),
                                            selected_by="best periodic agreement on the validation split "
                                                        "(heldout_prompts.jsonl); the test split chose nothing")
    write_manifest(a, model, reports["validation"], extra, test=reports.get("test"))


def cmd_all(a) -> None:
    minutes = a.minutes
    a.minutes = a.data_minutes
    cmd_data(a)
    a.minutes = a.train_minutes if minutes is None else minutes
    cmd_train(a)
    cmd_assemble(a)
    cmd_eval(a)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["data", "train", "eval", "assemble", "all"])
    p.add_argument("--target", default=str(DEFAULT_TARGET))
    p.add_argument("--out", default=str(ROOT / "models/student"))
    p.add_argument("--work", default=None, help="teacher shards and checkpoints (default OUT/work)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=None, help="budget of this step (data or train)")
    p.add_argument("--tokens", type=int, default=None, help="training token budget")
    p.add_argument("--data-minutes", type=float, default=50)
    p.add_argument("--train-minutes", type=float, default=50)
    p.add_argument("--heldout", type=int, default=200)
    p.add_argument("--max-prompts", type=int, default=0)
    p.add_argument("--skip-prompts", type=int, default=0, help="training prompts skipped (fresh data)")
    p.add_argument("--split", choices=["eval", "train", "all"], default="all",
                   help="data: validation+test answers (eval), training answers (train) or both")
    p.add_argument("--test", type=int, default=200, help="test-split prompts (reported, never used to choose)")
    p.add_argument("--teacher", default=None, help="teacher shard folder (default WORK/teacher)")
    p.add_argument("--max-prompt", type=int, default=320, help="prompt tokens kept")
    p.add_argument("--max-new", type=int, default=128)
    p.add_argument("--batch", type=int, default=32, help="live sequences while generating")
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--layers", default="0,1,10,20,29", help="target layers copied into the student")
    p.add_argument("--ffn", type=int, default=1392, help="student FFN width (pruned from the target's)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--prompt-weight", type=float, default=0.3, help="loss weight of prompt positions")
    p.add_argument("--eval-every", type=float, default=10.0, help="minutes between held-out evaluations")
    p.add_argument("--eval-subset", type=int, default=0, help="validation sequences used by periodic evals (0: all)")
    p.add_argument("--init-from", default=None, help="train on from this committed student folder")
    p.add_argument("--kl-w", type=float, default=1.0, help="loss weight: KL to the teacher over candidates")
    p.add_argument("--ce-w", type=float, default=0.5, help="loss weight: CE on the teacher's greedy token")
    p.add_argument("--mse-w", type=float, default=0.05, help="loss weight: full-vocabulary logit MSE")
    p.add_argument("--results", default=None, help="eval: also write the report JSON here")
    p.add_argument("--no-manifest", action="store_true", help="eval: leave manifest.json alone")
    p.add_argument("--calib", type=int, default=32, help="training sequences for FFN pruning statistics")
    p.add_argument("--log-every", type=float, default=60.0, help="seconds between training log lines")
    a = p.parse_args(argv)
    a.command_line = "python tools/train_student.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    dict(data=cmd_data, train=cmd_train, eval=cmd_eval, assemble=cmd_assemble, all=cmd_all)[a.command](a)


if __name__ == "__main__":
    main()
