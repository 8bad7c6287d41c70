"""The bytes a decode step must read from memory on one rank, for the bandwidth a benchmark reports: every weight
matrix it multiplies by, and the keys and values of every row's context.

A step's floor is these bytes over the memory bandwidth; "GB/s achieved" is them over the measured step time. The
KV cache is counted as the rows' contexts hold it (what attention must read at the least: the compiled step reads
its context bucket, a little more)."""

from __future__ import annotations


def weight_bytes_per_step(model) -> int:
    """Weight bytes one decode step reads on this rank: every matrix except the embedding table (one row); for a
    quantized weight, its int8 / packed int4 values and its scales (and zeros)."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())  # quantized weights hold buffers
    streamed = sum(t.nbytes for name, t in tensors if not name.startswith("tok_embeddings"))
    # A tied output is the embedding (named once, as tok_embeddings), yet read whole by the output projection.
    tied = model.output.weight is model.tok_embeddings.weight
    return streamed + (model.output.weight.nbytes if tied else 0)


def kv_bytes_per_token(model) -> int:
    """Bytes of one position's keys and values in this rank's cache, every layer."""
    attention = model.layers[0].attention
    itemsize = model.cache.k[0].dtype.itemsize if model.cache is not None else model.tok_embeddings.weight.itemsize
    return 2 * model.args.n_layers * attention.n_local_kv_heads * attention.head_dim * itemsize


def kv_bytes_per_decode_step(per_token: int, batch: int, prompt_len: int, gen_len: int) -> float:
    """KV cache bytes a decode step reads on average over a generation of gen_len tokens after prompt_len: its j-th
    decode step (j = 1 .. gen_len - 1; the first token comes from the prefill) attends over prompt_len + j positions
    of each of the batch's rows. 0 when there is no decode step."""
    if gen_len < 2:
        return 0.0
    mean_context = prompt_len + gen_len / 2  # the mean of prompt_len + j over j = 1 .. gen_len - 1
    return batch * per_token * mean_context
