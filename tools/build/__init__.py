"""Build-time code, run only by the set-up scripts in tools/ (never by a server or a device): model format
conversion (`convert`: GGUF <-> Hugging Face, ONNX export, the shipped pair) and the student's distillation
(`distill`). Needs the `build` extra (transformers, gguf, onnx) on top of the cloud one."""
