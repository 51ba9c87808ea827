"""Fast checks of the distillation pipeline: prompts, acceptance arithmetic, data -> train -> assemble."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from tools.build.distill import evaluate as ev
from tools.build.distill import prompts as pr
from tools.build.distill import teacher_data as td
from tools.build.distill import train as tr
from wisp_cloud.model.config import ModelArgs
from wisp_cloud.model.loader import load_model
from wisp_cloud.model.transformer import RaggedBatch, Transformer


def test_prompt_split_is_deterministic_and_disjoint(monkeypatch):
    monkeypatch.setattr(pr, "pydoc_snippets", lambda: [("json.dumps", "Serialize obj to a JSON formatted str. " * 3)])
    monkeypatch.setattr(pr, "file_snippets", lambda root, max_per_file=6: [])
    a, b = pr.build_prompts(), pr.build_prompts()
    assert a == b and len(a) > 0
    tr1, held1 = pr.split_prompts(a, n_heldout=50, seed=0)
    tr2, held2 = pr.split_prompts(b, n_heldout=50, seed=0)
    assert tr1 == tr2 and held1 == held2
    assert not {p.text_hash for p in tr1} & {p.text_hash for p in held1}
    assert all(pr.is_heldout(p) for p in held1)


def test_test_split_is_disjoint_from_validation_and_never_trained(monkeypatch):
    """The test split (reported only) shares no source text with the validation split or training."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_student", Path(__file__).parents[1] / "tools/train_student.py")
    ts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ts)
    docs = [(f"mod.f{i}", f"Function number {i} does a distinct documented thing, carefully. " * 2)
            for i in range(3000)]
    monkeypatch.setattr(pr, "pydoc_snippets", lambda: docs)
    monkeypatch.setattr(pr, "file_snippets", lambda root, max_per_file=6: [])
    prompts = pr.build_prompts()
    train, val = pr.split_prompts(prompts, n_heldout=20, seed=0)
    test = ts.test_prompts(prompts, val, 20, seed=0)
    assert len(test) == 20 and test == ts.test_prompts(prompts, val, 20, seed=0)
    assert all(pr.is_heldout(p) for p in test)
    hashes = {p.text_hash for p in test}
    assert not hashes & {p.text_hash for p in val} and not hashes & {p.text_hash for p in train}


def test_acceptance_arithmetic():
    m = [True, True, False, True, True, True, False, False, True]
    # k=2: round@0 a=2 -> next 3; @3 a=2 -> 6; @6 a=0 -> 7; @7 a=0 -> 8; @8 a=1 (end, no bonus)
    r = ev.acceptance([m], 2)
    assert (r["rounds"], r["accepted"], r["drafted"]) == (5, 5, 9)
    assert r["mean_accepted"] == 1.0 and r["tokens_per_round"] == 9 / 5
    # k=8: @0 a=2 -> 3; @3 a=3 -> 7; @7 a=0 -> 8; @8 a=1
    r8 = ev.acceptance([m], 8)
    assert (r8["rounds"], r8["accepted"], r8["drafted"]) == (4, 6, 8 + 6 + 2 + 1)  # drafts capped by what is left
    assert ev.acceptance([[]], 3)["rounds"] == 0
    assert ev.agreement([m, [False]]) == 6 / 10


def _tiny_target(tmp: Path) -> tuple[Transformer, dict]:
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=96, hidden_size=32,
               intermediate_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
               max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
               bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_hf_config(cfg))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    state = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    from safetensors.torch import save_file
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(state, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(cfg))
    return load_model(tmp), cfg


def test_pipeline_data_train_assemble(tmp_path):
    target, cfg = _tiny_target(tmp_path / "target")
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, 96) for _ in range(rng.randrange(3, 9))] for _ in range(10)]
    td.generate(target, prompts, tmp_path / "teacher", eos_ids=[2], max_new=6, batch=4, topk=4, shard_size=3,
                log=lambda s: None)
    recs = td.load_shards(tmp_path / "teacher")
    assert sorted(r["prompt_index"] for r in recs) == list(range(10))
    td.generate(target, prompts, tmp_path / "teacher", eos_ids=[2], max_new=6, log=lambda s: None)  # resume: no-op
    assert len(td.load_shards(tmp_path / "teacher")) == 10
    r = recs[0]
    assert r["top_ids"].shape == (len(r["ids"]) - 1, 4) and r["hidden"].shape == (len(r["ids"]) - 1, 32)
    assert torch.equal(r["top_ids"][r["n_prompt"] - 1:, 0], r["ids"][r["n_prompt"]:].int())
    # The teacher's hidden states reproduce its logits, and the training forward matches the cached one.
    logits_t = target(RaggedBatch.single(r["ids"][:-1].tolist(), target.new_cache()))
    hid = tr.hidden_forward(target, r["ids"][:-1].long()[None])[0]
    assert torch.allclose(hid @ target.embed_tokens.weight.T, logits_t, atol=1e-4)
    assert torch.allclose(r["hidden"].float(), hid, atol=1e-2, rtol=1e-2)

    student = tr.init_student(target, [0, 3], ffn_dim=40, calib=[x["ids"] for x in recs[:3]])
    assert student.args.n_layers == 2 and student.args.ffn_dim == 40
    assert not student.embed_tokens.weight.requires_grad
    ex = tr.make_examples(recs, prompt_weight=0.5)
    state = tr.train(student, ex, tmp_path / "ckpt.pt", minutes=None, tokens=150, max_tokens=64,
                     eval_fn=lambda m: ev.agreement(ev.match_vectors(m, recs)), eval_every_min=1e9, log=lambda s: None)
    assert state["tokens"] >= 150 and (tmp_path / "ckpt.pt").exists()

    out = tmp_path / "student"
    tr.save_student_files(student, cfg, out)
    assert "model.embed_tokens.weight" not in __import__("safetensors.torch").torch.load_file(
        str(out / "student_layers.safetensors"))
    hf = tr.assemble(out, tmp_path / "target", out / "hf")
    loaded = load_model(hf)
    ids = r["ids"][:-1].long()
    ref = tr.hidden_forward(student.eval(), ids[None])[0] @ student.embed_tokens.weight.T
    got = loaded(RaggedBatch.single(ids.tolist(), loaded.new_cache()))
    assert torch.allclose(got, ref, atol=1e-4)
    transformers = pytest.importorskip("transformers")
    hfm = transformers.AutoModelForCausalLM.from_pretrained(str(hf))
    with torch.no_grad():
        hf_logits = hfm(ids[None]).logits[0]
    assert torch.allclose(hf_logits, ref, atol=1e-4)
    matches = ev.match_vectors(loaded, recs)
    assert [len(m) for m in matches] == [len(x["ids"]) - x["n_prompt"] for x in recs]

    # Continued training from the committed files: evaluated before the first step, so only weights
    # that beat the starting point are ever saved.
    cont = tr.load_student(out, tmp_path / "target").train()
    cont.embed_tokens.weight.requires_grad_(False)
    start = ev.agreement(matches)
    saved = []
    st2 = tr.train(cont, ex, tmp_path / "ckpt2.pt", minutes=None, tokens=100, max_tokens=64, lr=1e-3,
                   eval_fn=lambda m: ev.agreement(ev.match_vectors(m, recs)), eval_every_min=1e9,
                   on_improve=lambda m, agree, state: saved.append(agree), log=lambda s: None, eval_first=True,
                   loss_weights=dict(ce_w=1.0))
    assert st2["history"][0]["step"] == 0 and abs(st2["history"][0]["agreement"] - start) < 1e-9
    assert saved[0] == st2["history"][0]["agreement"] and saved == sorted(saved)
