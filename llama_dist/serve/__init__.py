"""Serving over the tensor-parallel ranks: an OpenAI-compatible HTTP API on rank 0 (`api`), a continuous-batching
engine loop every rank runs (`engine_loop`), and the requests that pass between them (`requests`)."""
