"""Convert a Llama-family Hugging Face checkpoint directory to a GGUF file for llama.cpp.

    python tools/convert_hf_to_gguf.py models/student/hf models/student/student.q8_0.gguf --outtype q8_0

The tokenizer metadata is copied from the shipped SmolLM2 GGUF when its vocabulary and
pre-tokenizer match the checkpoint's tokenizer.json, and built from tokenizer.json otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.build.convert.hf_to_gguf import OUT_TYPES, convert_hf_to_gguf  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="HF checkpoint: config.json, *.safetensors, tokenizer.json")
    parser.add_argument("out", type=Path, help="the .gguf file to write")
    parser.add_argument("--outtype", choices=OUT_TYPES, default="f16",
                        help="weight type of 2-D tensors (norms stay f32); default f16")
    parser.add_argument("--vocab-from", default="auto",
                        help="GGUF to copy tokenizer metadata from: 'auto' (the shipped SmolLM2 GGUF if it "
                             "matches), a path (must match), or 'none' (build from tokenizer.json)")
    parser.add_argument("--pre", default=None,
                        help="force llama.cpp's pre-tokenizer name (e.g. gpt-2, smollm)")
    parser.add_argument("--name", default=None, help="general.name (default: the directory name)")
    args = parser.parse_args()
    vocab_from = None if args.vocab_from.lower() == "none" else args.vocab_from
    t0 = time.perf_counter()
    report = convert_hf_to_gguf(args.model_dir, args.out, out_type=args.outtype, vocab_from=vocab_from,
                                pre=args.pre, name=args.name)
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {report['path']} ({report['bytes'] / 2**20:.1f} MiB, {report['out_type']}, "
          f"{report['tensors']} tensors, {report['quantized']} quantized; vocabulary from "
          f"{report['vocab_source']}) in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
