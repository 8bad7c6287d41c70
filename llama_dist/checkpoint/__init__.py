"""Checkpoints on disk: the formats (Meta's consolidated shards, Hugging Face safetensors, quantized int8, md5
checklists) read through one interface (`formats`), the one loader (`loader`), the memory check, conversion and
quantization (`convert`)."""
