import glob

from setuptools import find_packages, setup

setup(
    name="llama_dist",
    version="0.1.0",
    description=(
        "Tensor-parallel inference runtime for Llama checkpoints in Meta's or Hugging Face's layout "
        "(torchrun, SLURM, or plain Python)"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["llama_dist", "llama_dist.*"]),
    # The C++ kernels compiled at first use on the user's machine (model/native.py).
    package_data={"llama_dist.model": ["csrc/*.cpp"]},
    python_requires=">=3.10",
    # torch is deliberately unpinned here so an existing CUDA build is kept; install torch first
    # (README / .ci/run pin torch==2.13.0) or pip may resolve a multi-GB CUDA build.
    install_requires=[
        "torch>=2.4", "fairscale>=0.4.13", "tiktoken>=0.7", "sentencepiece>=0.2", "fire>=0.6",
        # Hugging Face checkpoints (safetensors), tokenizer.json files, and the chat templates (jinja2 >= 3.1.6:
        # older ones have sandbox escapes); tqdm draws the loading progress bar.
        "safetensors>=0.4", "tokenizers>=0.20", "jinja2>=3.1.6", "tqdm>=4.60",
        # The OpenAI-compatible server (`llama-dist serve`): the HTTP stack the ecosystem uses, not a hand-made one.
        "fastapi>=0.110", "uvicorn>=0.29",
        # /metrics in Prometheus' text format; structured output's grammars (engine/structured_output.py says why
        # llguidance).
        "prometheus_client>=0.20", "llguidance>=1.0",
        # The build tool torch's C++ extension loader drives (model/native.py compiles the int8 one-row kernel).
        "ninja>=1.11",
    ],
    extras_require={
        # Test-only oracles: Meta's reference implementation + Llama 3 tokenizer, and HF transformers; the official
        # openai client (and httpx for raw requests) as the server's test client.
        "test": ["pytest>=8", "llama-models>=0.3", "transformers>=5.0", "openai>=1.40", "httpx>=0.27",
                 "jsonschema>=4"],
    },
    # The bundled tiny model, found by the CLI under sys.prefix when the package is not run from a checkout.
    data_files=[("share/llama_dist/checkpoints/tiny", sorted(glob.glob("checkpoints/tiny/*")))],
    entry_points={"console_scripts": ["llama-dist=llama_dist.cli:main"]},
)
