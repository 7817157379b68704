"""GPT / Llama / bidirectional transformer, LoRA and probes as pure functions over pytrees."""
