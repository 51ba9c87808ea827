"""Bad model input gets a clear error: a drafter with another vocabulary is refused at load, naming
both sizes and the first differing token; a missing model file names its path and the build command."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from tools.build.convert.hf_to_gguf import convert_hf_to_gguf
from wisp_cloud.local_pair import LocalPair
from wisp_cloud.model.loader import ModelNotFoundError, load_model
from wisp_edge.drafters import load_drafter
from wisp_edge.wire.vocab import VocabMismatchError, check_same_vocab, fingerprint

TARGET = Path(__file__).resolve().parents[1] / "models" / "target"


def _tiny_llama_with_vocab(out: Path, tokenizer_json: dict) -> Path:
    torch.manual_seed(0)
    vocab = len(tokenizer_json["model"]["vocab"])
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    shutil.copyfile(TARGET / "tokenizer_config.json", out / "tokenizer_config.json")
    return out


def test_drafter_with_another_vocabulary_is_refused(tmp_path, target_model):
    data = json.loads((TARGET / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]  # token -> id
    # Another tokenizer: two ordinary tokens swap ids (same size, different table).
    a, b = (tok for tok, i in vocab.items() if i in (1000, 1001))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    model_dir = _tiny_llama_with_vocab(tmp_path / "other", data)
    gguf = tmp_path / "other.gguf"
    convert_hf_to_gguf(model_dir, gguf, out_type="f32", vocab_from=None)
    with pytest.raises(VocabMismatchError) as err:
        LocalPair.load(gguf, TARGET, model=target_model, n_threads=1)
    message = str(err.value)
    assert "49152 tokens" in message and "first difference at id 1000" in message, message


def test_mismatch_message_names_sizes_and_first_token():
    with pytest.raises(VocabMismatchError) as err:
        check_same_vocab([b"a", b"b", b"c"], ["a", "b", "x", "y"], drafter_name="d", target_name="t")
    assert "d has 3 tokens, t has 4" in str(err.value) and "id 2: 'c' vs 'x'" in str(err.value)
    check_same_vocab([b"a", b"b"], ["a", "b"])
    assert fingerprint([b"a", b"b"]) == fingerprint(["a", "b"]) != fingerprint(["ab", ""])


def test_missing_drafter_names_path_and_command(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_drafter(tmp_path / "nope.gguf")
    assert str(tmp_path / "nope.gguf") in str(err.value) and "tools/build_models.py" in str(err.value)


def test_missing_target_names_path_and_command(tmp_path):
    with pytest.raises(ModelNotFoundError) as err:
        load_model(tmp_path / "no-target")
    assert str(tmp_path / "no-target" / "config.json") in str(err.value) and "tools/build_models.py" in str(err.value)
