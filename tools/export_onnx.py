"""Export a Llama-family Hugging Face checkpoint to an ONNX decoder with an explicit KV cache.

    python tools/export_onnx.py models/student/hf models/student/onnx/model.onnx --verify

tokenizer.json is copied next to the .onnx file (OnnxDrafter reads it from there). --verify runs
onnxruntime against the torch model on a random token sequence and fails above --atol.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.build.convert.hf_to_onnx import export_onnx, verify_onnx  # noqa: E402
from wisp_cloud.model.loader import load_args  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="HF checkpoint: config.json, *.safetensors, tokenizer.json")
    parser.add_argument("out", type=Path, help="the .onnx file to write")
    parser.add_argument("--all-logits", action="store_true",
                        help="output logits for every new token (default: the last position only)")
    parser.add_argument("--verify", action="store_true", help="compare onnxruntime with torch after export")
    parser.add_argument("--atol", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads for --verify")
    args = parser.parse_args()
    t0 = time.perf_counter()
    path = export_onnx(args.model_dir, args.out, all_logits=args.all_logits)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s")
    if args.verify:
        vocab = load_args(args.model_dir).vocab_size
        tokens = np.random.default_rng(0).integers(0, vocab, 24).tolist()
        diff = verify_onnx(args.model_dir, path, tokens, chunks=(8, 4), n_threads=args.threads)
        print(f"max |onnxruntime - torch| over {len(tokens)} positions: {diff:.3g}")
        if not diff <= args.atol:
            sys.exit(f"verification failed: {diff:.3g} > atol {args.atol}")


if __name__ == "__main__":
    main()
