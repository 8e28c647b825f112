"""In-process branches on transformers models: full copies or LoRA adapters, text or vision-language, with their decoding."""
