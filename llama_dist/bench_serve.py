"""`python -m llama_dist.bench_serve ...`: kept for scripts that call it; the same as `python -m llama_dist.bench serve`."""

from llama_dist.bench.serve import main

if __name__ == "__main__":
    main()
