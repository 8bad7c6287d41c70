"""Benchmarks that print tables: decode speed (`decode`), transformers side by side (`hf`), GPU timing (`gpu`),
the server under load (`serve`). Run them as `python -m llama_dist.bench COMMAND ...`; each imports its optional
dependencies (transformers, the openai client) only when it runs."""
