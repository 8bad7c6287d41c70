import atexit
import os
import shutil
import tempfile

import pytest

# The suite tests the CPU path (gloo, float32): on a machine with CUDA, init_distributed would otherwise pick NCCL
# and bfloat16 behind the tests' back. Spawned ranks inherit this. A GPU test set must opt in explicitly.
if os.environ.get("LLAMA_DIST_GPU_TESTS") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

# Models build with the static kernel rule (spawned ranks and CLI subprocesses inherit it): measuring at every
# build would add up to seconds to each test and write to the user's cache. The kernel-choice tests opt in
# (tests/multirank/test_kernel_choice.py).
os.environ.setdefault("LLAMA_DIST_KERNEL_CHOICE", "static")

# The compiled kernels (llama_dist/model/native.py) are built once per test session, into a directory of the
# session's own: every run proves the build from scratch, and the suite never writes to the user's cache. The
# tests of the build itself use directories of their own (tests/unit/test_native.py).
_NATIVE_DIR = tempfile.mkdtemp(prefix="llama_dist_native_")
os.environ.setdefault("LLAMA_DIST_NATIVE_CACHE", _NATIVE_DIR)
atexit.register(shutil.rmtree, _NATIVE_DIR, ignore_errors=True)


# ---- tokenizer fixtures (tests/test_tokenizer.py, tests/test_chat.py) -------------------------------

def _spm_training_text() -> list[str]:
    # Deterministic, varied enough that BPE learns real merges, including the chat markers.
    words = ["the", "model", "token", "llama", "answer", "question", "hello", "world", "system", "user",
             "assistant", "prompt", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "12345", "café", "naïve"]
    lines = []
    for i in range(2000):
        lines.append(" ".join(words[(i * 7 + k * 3) % len(words)] for k in range(3 + i % 9)))
    return lines


@pytest.fixture(scope="session")
def spm_model_path(tmp_path_factory) -> str:
    """A tiny SentencePiece BPE model with Llama 2's special-id layout (unk 0, bos 1, eos 2, no pad)."""
    from helpers import SPM_VOCAB

    from llama_dist.text.tokenizer import train_llama2_style_tokenizer

    path = tmp_path_factory.mktemp("spm") / "tiny.model"
    return str(train_llama2_style_tokenizer(_spm_training_text(), SPM_VOCAB, path))

@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory) -> str:
    """A Hugging Face tokenizer directory (tests/hf_tokenizer.py): byte-level BPE with Llama 3's special tokens,
    384 ids, a Llama-3-style chat template in tokenizer_config.json. Copy it before changing its files."""
    pytest.importorskip("transformers", reason="transformers (the reference for Hugging Face tokenizers) not installed")
    from hf_tokenizer import write_hf_tokenizer

    out = tmp_path_factory.mktemp("hf_tokenizer")
    write_hf_tokenizer(out)
    return str(out)

# ---- end tokenizer fixtures ---------------------------------------------------------------------------


# ---- SLURM cluster fixture (tests/slurm_cluster.py, tests/test_slurm_distributed.py) --------------------

@pytest.fixture(scope="session")
def slurm_cluster():
    """A real one-node SLURM (slurmctld + slurmd + munged) for the whole session; skips when it cannot run."""
    from slurm_cluster import SlurmCluster, slurm_unavailable_reason

    reason = slurm_unavailable_reason()
    if reason and os.environ.get("LLAMA_DIST_REQUIRE_SLURM") == "1":  # CI installs SLURM: a skip there is a failure
        pytest.fail(f"LLAMA_DIST_REQUIRE_SLURM=1 but {reason}")
    if reason:
        pytest.skip(reason)
    with SlurmCluster() as cluster:
        yield cluster

# ---- end SLURM cluster fixture -------------------------------------------------------------------------
