"""The Llama model as math: `llama` (the transformer), `rope`, the tensor-parallel split layers and their
`ShardSpec`s (`parallel`), the kernel of each weight (`kernels`: dense, int8, int4), the weight inventory
(`weights`), quantized weights (`quant`) and `inspection`. Nothing here reads files or schedules requests."""
