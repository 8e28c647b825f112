"""Where base models come from: transformers folders, hub ids, GGUF files, tiny builds, packaged checkpoints."""
