"""The compact transformer (wisp_cloud.model) computes the same logits as Hugging Face transformers.

Tiny *random* models are built with transformers itself (seeded, saved with ``save_pretrained`` to
temporary directories; nothing is downloaded) for each architecture feature the compact model
claims to support, then loaded with ``wisp_cloud.model.loader.load_model`` and compared:

* the full sequence in one forward,
* the same sequence fed in chunks through the KV cache,
* a ragged batch of several sessions with different cached prefixes and new-token counts,
* ``commit`` keeping fewer tokens than were fed (rollback), then a new forward.

The shipped target (``models/target``, SmolLM2-135M-Instruct) is checked too (built by the set-up).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from wisp_cloud.model.config import ModelArgs
from wisp_cloud.model.loader import TARGET_BUILD_HINT, ModelNotFoundError, load_args, load_model
from wisp_cloud.model.transformer import RaggedBatch, Transformer, commit, rope_inv_freq

REPO = Path(__file__).resolve().parents[1]
TARGET_DIR = REPO / "models" / "target"
ATOL = 1e-4  # float32, tiny models
VOCAB = 97
SEQ_LEN = 48

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
               max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

# name -> (config class name, model class name, config kwargs, save_pretrained kwargs)
CASES = {
    "llama_gqa_tied": ("LlamaConfig", "LlamaForCausalLM",
                       dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                            rope_theta=10000.0), {}),
    "llama_mha_untied_theta": ("LlamaConfig", "LlamaForCausalLM",
                               dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                                    rope_theta=500000.0), {}),
    "llama3_rope_scaling": ("LlamaConfig", "LlamaForCausalLM",
                            # head_dim 16, theta 1e4: wavelengths 6..2e4 straddle both thresholds (8 and 32)
                            dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
                                 rope_theta=10000.0,
                                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
                            {}),
    "qwen2_bias": ("Qwen2Config", "Qwen2ForCausalLM",
                   dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                        rope_theta=1000000.0), {}),
    "qwen3_qknorm_head_dim": ("Qwen3Config", "Qwen3ForCausalLM",
                              # head_dim 24 != hidden 64 / heads 4
                              dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                   tie_word_embeddings=False, rope_theta=1000000.0), {}),
    "mistral_window": ("MistralConfig", "MistralForCausalLM",
                       # the window (64) caps max_seq_len; every test sequence fits inside it
                       dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=64,
                            tie_word_embeddings=False), {}),
    "llama_sharded": ("LlamaConfig", "LlamaForCausalLM",
                      dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False),
                      dict(max_shard_size="40KB")),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that every term matters (HF's init gives near-zero biases and unit norms)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.3 * noise)
            else:
                p.copy_(0.12 * noise)


class Pair:
    """One architecture: the transformers reference and the compact model loaded from its checkpoint."""

    def __init__(self, name: str, root: Path) -> None:
        cfg_cls, model_cls, cfg_kwargs, save_kwargs = CASES[name]
        config = getattr(transformers, cfg_cls)(**_COMMON, **cfg_kwargs)
        torch.manual_seed(0)
        hf = getattr(transformers, model_cls)(config)
        _randomize(hf, seed=sum(map(ord, name)))
        hf = hf.float().eval()
        hf.config._attn_implementation = "eager"  # plainest reference
        self.dir = root / name
        hf.save_pretrained(self.dir, **save_kwargs)
        self.hf = hf
        self.model = load_model(self.dir)
        g = torch.Generator().manual_seed(1)
        self.tokens = torch.randint(0, VOCAB, (SEQ_LEN,), generator=g).tolist()
        self._ref: dict[tuple[int, ...], torch.Tensor] = {}

    def ref(self, tokens: list[int]) -> torch.Tensor:
        key = tuple(tokens)
        if key not in self._ref:
            with torch.no_grad():
                self._ref[key] = self.hf(torch.tensor([tokens])).logits[0].float()
        return self._ref[key]


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory) -> Pair:
    return Pair(request.param, tmp_path_factory.mktemp("ckpt"))


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> float:
    diff = (actual - expected).abs().max().item()
    assert diff <= atol, f"max |diff| {diff:.3g} > {atol} (logits up to {expected.abs().max().item():.3g})"
    return diff


def _prefill(model: Transformer, tokens: list[int], capacity: int = 8):
    cache = model.new_cache(capacity=capacity)
    if tokens:
        b = RaggedBatch.single(tokens, cache)
        model(b)
        commit(b, [len(tokens)])
    return cache


# --- config parsing --------------------------------------------------------------------------------


def test_checkpoint_layout(pair):
    cfg = json.loads((pair.dir / "config.json").read_text())
    args = load_args(pair.dir)
    hf_cfg = pair.hf.config
    assert args.n_heads == hf_cfg.num_attention_heads and args.n_kv_heads == hf_cfg.num_key_value_heads
    assert args.head_dim == pair.hf.model.layers[0].self_attn.head_dim
    assert args.tie_embeddings == bool(cfg.get("tie_word_embeddings"))
    if args.tie_embeddings:
        assert pair.model.lm_head.weight.data_ptr() == pair.model.embed_tokens.weight.data_ptr()
    if "sharded" in pair.dir.name:
        shards = set(json.loads((pair.dir / "model.safetensors.index.json").read_text())["weight_map"].values())
        assert len(shards) >= 3, shards
    # same tensors as transformers' (names without "model."), whatever their memory layout
    hf_shapes = {k.removeprefix("model."): v.shape for k, v in pair.hf.state_dict().items()}
    if args.tie_embeddings:
        hf_shapes.pop("lm_head.weight", None)
    ours = {k: v.shape for k, v in pair.model.state_dict().items()
            if not (args.tie_embeddings and k == "lm_head.weight")}
    assert ours == hf_shapes
    # rotary frequencies equal transformers' (covers rope_theta and llama3 scaling)
    hf_inv = pair.hf.model.rotary_emb.inv_freq.float()
    torch.testing.assert_close(pair.model.inv_freq, hf_inv, rtol=1e-6, atol=0)


def test_rope_config_spellings():
    """transformers 5 writes ``rope_parameters`` (theta inside); older configs ``rope_scaling`` + ``rope_theta``."""
    base = dict(model_type="llama", vocab_size=10, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=8)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    new = ModelArgs.from_hf_config({**base, "rope_parameters": {**llama3, "rope_theta": 500000.0}})
    old = ModelArgs.from_hf_config({**base, "rope_theta": 500000.0, "rope_scaling": llama3})
    older = ModelArgs.from_hf_config({**base, "rope_theta": 500000.0,
                                      "rope_scaling": {**{k: v for k, v in llama3.items() if k != "rope_type"},
                                                       "type": "llama3"}})
    for a in (new, old, older):
        assert a.rope_theta == 500000.0
        assert a.rope_scaling and a.rope_scaling["factor"] == 8.0
        torch.testing.assert_close(rope_inv_freq(a), rope_inv_freq(new))
    plain = ModelArgs.from_hf_config({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert plain.rope_theta == 1e6 and plain.rope_scaling is None
    assert ModelArgs.from_hf_config(base).rope_theta == 10000.0
    with pytest.raises(ValueError, match="rope"):  # would silently give wrong logits if ignored
        ModelArgs.from_hf_config({**base, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}})


def test_sliding_window_caps_the_sequence_length(pair):
    cfg = json.loads((pair.dir / "config.json").read_text())
    args = load_args(pair.dir)
    if "mistral" not in pair.dir.name:
        assert args.max_seq_len == cfg["max_position_embeddings"]
        return
    assert args.max_seq_len == 64
    cache = _prefill(pair.model, [3] * 60)
    with pytest.raises(ValueError, match="max_seq_len"):
        pair.model(RaggedBatch.single([4] * 5, cache))
    base = dict(vocab_size=10, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=8,
                max_position_embeddings=32768, sliding_window=4096)
    assert ModelArgs.from_hf_config({**base, "model_type": "mistral"}).max_seq_len == 4096
    assert ModelArgs.from_hf_config({**base, "model_type": "mistral", "sliding_window": None}).max_seq_len == 32768
    assert ModelArgs.from_hf_config({**base, "model_type": "qwen2", "use_sliding_window": False}).max_seq_len == 32768
    assert ModelArgs.from_hf_config({**base, "model_type": "qwen2", "use_sliding_window": True}).max_seq_len == 4096
    assert ModelArgs.from_hf_config({**base, "model_type": "qwen2",
                                     "layer_types": ["full_attention", "sliding_attention"]}).max_seq_len == 4096


def test_unsupported_model_type_is_a_clear_error(tmp_path):
    cfg = dict(model_type="gpt2", vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=8)
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt2'.*llama"):
        ModelArgs.from_hf_config(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="gpt2"):
        load_model(tmp_path)


def test_missing_checkpoint_names_path_and_build_command(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelNotFoundError) as err:
        load_model(missing)
    assert str(missing) in str(err.value) and TARGET_BUILD_HINT in str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    # config present but no weights
    (tmp_path / "config.json").write_text(json.dumps(dict(
        model_type="llama", vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=8)))
    with pytest.raises(ModelNotFoundError) as err:
        load_model(tmp_path)
    assert str(tmp_path) in str(err.value) and TARGET_BUILD_HINT in str(err.value)


def test_missing_shard_is_named(tmp_path):
    config = transformers.LlamaConfig(**_COMMON, num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / shard).unlink()
    with pytest.raises(ModelNotFoundError, match=shard):
        load_model(tmp_path)


# --- numerics --------------------------------------------------------------------------------------


def test_full_sequence_logits(pair):
    ref = pair.ref(pair.tokens)
    cache = pair.model.new_cache(capacity=4)  # forces growth inside the forward
    out = pair.model(RaggedBatch.single(pair.tokens, cache))
    assert out.shape == ref.shape and out.dtype == torch.float32
    _close(out, ref)
    # logit_rows: only the asked-for rows, same values
    rows = torch.tensor([0, 7, SEQ_LEN - 1])
    cache = pair.model.new_cache()
    _close(pair.model(RaggedBatch.single(pair.tokens, cache), logit_rows=rows), ref[rows])


def test_chunked_through_cache(pair):
    ref = pair.ref(pair.tokens)
    cache = pair.model.new_cache(capacity=2)
    outs, pos = [], 0
    for n in (1, 1, 5, 2, 9, 1, 13, 3, 13):
        b = RaggedBatch.single(pair.tokens[pos:pos + n], cache)
        outs.append(pair.model(b))
        commit(b, [n])
        pos += n
    assert pos == SEQ_LEN and cache.length == SEQ_LEN
    _close(torch.cat(outs), ref)


def test_ragged_batch_equals_solo_runs(pair):
    g = torch.Generator().manual_seed(2)
    # (cached prefix, new tokens) per session, including an empty cache and single-token decodes
    shapes = [(0, 6), (17, 1), (5, 9), (30, 4), (1, 1), (11, 12)]
    seqs = [torch.randint(0, VOCAB, (p + n,), generator=g).tolist() for p, n in shapes]
    caches = [_prefill(pair.model, s[:p]) for s, (p, _) in zip(seqs, shapes)]
    news = [s[p:] for s, (p, _) in zip(seqs, shapes)]
    batch = RaggedBatch(torch.tensor([t for s in news for t in s]), [len(s) for s in news], caches)
    out = pair.model(batch)
    for i, (seq, (p, n)) in enumerate(zip(seqs, shapes)):
        got = out[batch.offsets[i]:batch.offsets[i + 1]]
        _close(got, pair.ref(seq)[p:p + n])
        # the same session run on its own through the compact model agrees too
        solo = pair.model(RaggedBatch.single(news[i], _prefill(pair.model, seq[:p])))
        _close(got, solo, atol=1e-5)
    # logit_rows over the packed batch: each session's last row
    rows = torch.tensor(batch.offsets[1:]) - 1
    caches2 = [_prefill(pair.model, s[:p]) for s, (p, _) in zip(seqs, shapes)]
    last = pair.model(RaggedBatch(batch.tokens, batch.seq_lens, caches2), logit_rows=rows)
    _close(last, out[rows], atol=1e-5)


def test_commit_rollback_equals_fresh_run(pair):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (p,), generator=g).tolist() for p in (9, 4, 20)]
    drafts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (6, 5, 3)]
    kept = [2, 0, 3]  # keep some, none, all
    caches = [_prefill(pair.model, p) for p in prompts]
    b = RaggedBatch(torch.tensor([t for d in drafts for t in d]), [len(d) for d in drafts], caches)
    pair.model(b)
    commit(b, kept)
    assert [c.length for c in caches] == [len(p) + k for p, k in zip(prompts, kept)]
    # new tokens after the rollback overwrite the rejected positions
    nxt = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (4, 1, 2)]
    b2 = RaggedBatch(torch.tensor([t for s in nxt for t in s]), [len(s) for s in nxt], caches)
    out = pair.model(b2)
    commit(b2, [len(s) for s in nxt])
    for i, (p, d, k, s) in enumerate(zip(prompts, drafts, kept, nxt)):
        full = p + d[:k] + s
        _close(out[b2.offsets[i]:b2.offsets[i + 1]], pair.ref(full)[len(full) - len(s):])
    # a single-token continuation after all that still matches
    tail = [5]
    b3 = RaggedBatch.single(tail, caches[0])
    full = prompts[0] + drafts[0][:2] + nxt[0] + tail
    _close(pair.model(b3), pair.ref(full)[-1:])


# --- the shipped target ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def target(target_model):
    """(HF tokenizer, transformers reference, compact model); conftest's `target_model` fails loudly if unbuilt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TARGET_DIR)
    hf = AutoModelForCausalLM.from_pretrained(TARGET_DIR, dtype=torch.float32).eval()
    return tok, hf, target_model


def _chat_ids(tok, question: str) -> list[int]:
    enc = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  tokenize=True)
    return list(enc["input_ids"] if hasattr(enc, "keys") else enc)


def test_target_logits_match_transformers(target):
    tok, hf, model = target
    ids = _chat_ids(tok, "Write a haiku about speculative decoding, then explain it in one sentence.")
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    out = model(RaggedBatch.single(ids, model.new_cache()))
    _close(out, ref, atol=1e-3)
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_target_greedy_decode(target):
    tok, _, model = target
    ids = _chat_ids(tok, "What is the capital of France?")
    cache = model.new_cache()
    b = RaggedBatch.single(ids, cache)
    logits = model(b, logit_rows=torch.tensor([len(ids) - 1]))
    commit(b, [len(ids)])
    out: list[int] = []
    for _ in range(24):
        t = int(logits[-1].argmax())
        if t in model.args.eos_token_ids or t == tok.eos_token_id:
            break
        out.append(t)
        b = RaggedBatch.single([t], cache)
        logits = model(b)
        commit(b, [1])
    assert tok.decode(out) == "The capital of France is Paris."
