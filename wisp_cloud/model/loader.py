"""Load a Hugging Face checkpoint directory (config.json + one or sharded *.safetensors) into `Transformer`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from wisp_cloud.model.config import ModelArgs
from wisp_cloud.model.transformer import Transformer, rope_inv_freq, use_column_major_weights

TARGET_BUILD_HINT = "python tools/build_models.py"


class ModelNotFoundError(FileNotFoundError):
    """A checkpoint directory or file is missing; the message names the path and how to build it."""


def _checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"no *.safetensors in {model_dir}; build the shipped target with `{TARGET_BUILD_HINT}`")
    return files


def load_args(model_dir: str | Path) -> ModelArgs:
    config = Path(model_dir) / "config.json"
    if not config.exists():
        raise ModelNotFoundError(f"model checkpoint not found: {config} is missing; "
                                 f"build the shipped target with `{TARGET_BUILD_HINT}`")
    return ModelArgs.from_hf_config(json.loads(config.read_text()))


def load_model(model_dir: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    """Build the model from config.json and fill it from the safetensors shards (strict: no missing weights)."""
    model_dir = Path(model_dir)
    args = load_args(model_dir)
    with torch.device("meta"):
        model = Transformer(args)
    state: dict[str, torch.Tensor] = {}
    for path in _checkpoint_files(model_dir):
        if not path.exists():
            raise ModelNotFoundError(f"checkpoint shard missing: {path}")
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                key = name.removeprefix("model.")
                if "rotary_emb" in key:
                    continue
                state[key] = f.get_tensor(name).to(dtype)
    if args.tie_embeddings:
        state.pop("lm_head.weight", None)
    model = model.to_empty(device=device).to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (args.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"checkpoint {model_dir} does not match the {args.model_type} architecture: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    if args.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(args).to(device)
    if model.device.type == "cpu":
        use_column_major_weights(model)
    return model.eval()

