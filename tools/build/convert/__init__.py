"""Model files for both sides: GGUF <-> Hugging Face checkpoints, the ONNX drafter, and the shipped pair."""
