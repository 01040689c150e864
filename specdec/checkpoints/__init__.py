"""Checkpoint readers behind `specdec.loading`: HF safetensors folders and GGUF files."""
