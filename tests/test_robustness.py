"""Bad input fails with one named error on every rank, checkpoints load safely, output is deterministic.

Every case goes through the public API (Llama.build, generate, generate_stream, text_completion,
chat_completion) on real gloo ranks. Launches are few and batched: one worker per world size runs all of
its cases and returns each case's outcome, (exception type, message) or the output, per rank.
"""

import hashlib
import os
import shlex
import shutil

import pytest
import torch

from llama_dist.chat import DialogError
from llama_dist.checkpoint import CheckpointError, file_md5, read_checklist, shard_paths, verify_checklist
from llama_dist.config import ConfigError
from llama_dist.distributed import DEFAULT_TIMEOUT_S, default_timeout_s, init_distributed
from llama_dist.generation import Llama, RequestError
from llama_dist.local_launch import run_local
from multirank import RunsShellCommand, tiny_args, write_checkpoint

VOCAB = 384  # divisible by 1, 2, 3 and 4 ranks, so every world size gets past the vocabulary split
MAX_SEQ_LEN, MAX_BATCH = 48, 3
PROMPTS = [[1, 17, 42, 99, 7, 250], [1, 5], [1, 300, 301, 302]]
GOOD = [[1, 20, 30]]  # the request that must still work after every failed one
HEADS4 = tiny_args(vocab_size=VOCAB, n_kv_heads=2)  # 4 heads, 2 KV heads: runs on 1, 2 and 4 ranks
HEADS6 = tiny_args(vocab_size=VOCAB, dim=96, n_heads=6, n_kv_heads=6, multiple_of=48)  # runs on 1, 2, 3, 6


# ---- files -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> str:
    """A SentencePiece BPE model with Llama 2's special ids and VOCAB pieces."""
    import sentencepiece as spm

    words = ["the", "model", "token", "llama", "answer", "question", "hello", "world", "user", "assistant",
             "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "12345"]
    lines = [" ".join(words[(i * 7 + k * 3) % len(words)] for k in range(3 + i % 9)) for i in range(1000)]
    prefix = tmp_path_factory.mktemp("spm384") / "tok"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(prefix), model_type="bpe", vocab_size=VOCAB,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0, minloglevel=2,
    )
    return str(prefix) + ".model"


def write_checklist(ckpt_dir, names=None) -> None:
    """Meta's checklist.chk for `names` (default: params.json and every shard), md5s computed independently."""
    names = names or ["params.json"] + [p.name for p in shard_paths(ckpt_dir)]
    lines = [f"{hashlib.md5((ckpt_dir / n).read_bytes()).hexdigest()}  {n}" for n in names]
    (ckpt_dir / "checklist.chk").write_text("\n".join(lines) + "\n")


def copy_of(src, dst):
    shutil.copytree(src, dst)
    return dst


def flip_bytes(path, offset: int, count: int = 16) -> None:
    """Corrupt `count` bytes in the middle of a tensor's data: torch.load does not notice, md5 does."""
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = bytes(b ^ 0xFF for b in data[offset : offset + count])
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tokenizer_path) -> dict:
    """Good checkpoints and one broken copy per build case; each dir holds its tokenizer.model."""
    root = tmp_path_factory.mktemp("robust")
    good = root / "good"
    write_checkpoint(good, HEADS4, seed=11)
    shutil.copy(tokenizer_path, good / "tokenizer.model")
    write_checklist(good)
    heads6 = root / "heads6"
    write_checkpoint(heads6, HEADS6, seed=12)
    shutil.copy(tokenizer_path, heads6 / "tokenizer.model")
    paths = {"good": good, "heads6": heads6, "root": root, "marker": root / "pwned"}

    (copy_of(good, root / "missing_params") / "params.json").unlink()
    two = root / "two_shards"
    write_checkpoint(two, HEADS4, num_shards=2, seed=11)
    shutil.copy(tokenizer_path, two / "tokenizer.model")
    write_checklist(two)
    (copy_of(two, root / "last_shard_missing") / "consolidated.01.pth").unlink()
    gap = copy_of(two, root / "shard_gap")
    (gap / "consolidated.01.pth").rename(gap / "consolidated.02.pth")
    for p in shard_paths(copy_of(good, root / "no_shards")):
        p.unlink()
    vocab = copy_of(good, root / "vocab_mismatch")
    params = (vocab / "params.json").read_text()
    (vocab / "params.json").write_text(params.replace(f'"vocab_size": {VOCAB}', '"vocab_size": 512'))
    shard = copy_of(good, root / "truncated_shard") / "consolidated.00.pth"
    os.truncate(shard, shard.stat().st_size // 2)
    (copy_of(good, root / "garbage_shard") / "consolidated.00.pth").write_bytes(b"not a checkpoint\n" * 256)
    shard = copy_of(good, root / "flipped_shard") / "consolidated.00.pth"
    flip_bytes(shard, shard.stat().st_size // 2)
    (copy_of(good, root / "no_checklist") / "checklist.chk").unlink()

    evil = copy_of(good, root / "malicious_shard")
    payload = torch.load(evil / "consolidated.00.pth", weights_only=True)
    payload["exploit"] = RunsShellCommand(f"touch {shlex.quote(str(paths['marker']))}")
    torch.save(payload, evil / "consolidated.00.pth")

    for shards in (2, 4):  # neither divides nor is a multiple of 3 ranks
        write_checkpoint(root / f"heads6_{shards}_shards", HEADS6, num_shards=shards)
        shutil.copy(tokenizer_path, root / f"heads6_{shards}_shards" / "tokenizer.model")
    return {k: str(v) for k, v in paths.items()}


# ---- bad checkpoints: Llama.build at 2 ranks -----------------------------------------------------------------

# name -> (ckpt dir under root, build kwargs, expected exception type or None for "loads", message parts)
BUILD_CASES = {
    "missing_dir": ("no_such_dir", {}, FileNotFoundError, ["checkpoint directory not found", "no_such_dir"]),
    "missing_params": ("missing_params", {}, FileNotFoundError, ["params.json not found", "missing_params"]),
    "no_shards": ("no_shards", {}, FileNotFoundError, ["no consolidated.NN.pth shards", "no_shards"]),
    "shard_gap": ("shard_gap", {}, FileNotFoundError, ["shard_gap", "lacks shard(s) consolidated.01.pth"]),
    "last_shard_missing": (
        "last_shard_missing", {}, CheckpointError, ["tok_embeddings.weight", "192 of the 384 rows", "shard missing"]
    ),
    "last_shard_missing_verified": (
        "last_shard_missing", {"verify_checksums": True}, CheckpointError,
        ["consolidated.01.pth is listed in", "checklist.chk but missing"],
    ),
    "missing_tokenizer": ("good", {"tokenizer_path": "no_such.model"}, FileNotFoundError,
                          ["tokenizer file not found", "no_such.model"]),
    "vocab_mismatch": ("vocab_mismatch", {}, CheckpointError, [f"has {VOCAB} tokens", "vocabulary of 512"]),
    "truncated_shard": ("truncated_shard", {}, CheckpointError, ["consolidated.00.pth is truncated or corrupt"]),
    "garbage_shard": ("garbage_shard", {}, CheckpointError, ["consolidated.00.pth is truncated or corrupt"]),
    "malicious_shard": ("malicious_shard", {}, CheckpointError, ["consolidated.00.pth", "refused to unpickle"]),
    "checksum_mismatch": ("flipped_shard", {"verify_checksums": True}, CheckpointError,
                          ["flipped_shard/consolidated.00.pth has md5", "but", "checklist.chk says"]),
    "no_checklist": ("no_checklist", {"verify_checksums": True}, CheckpointError,
                     ["cannot verify checksums", "no_checklist/checklist.chk not found"]),
    "missing_on_rank_1_only": ("good", {"rank1_ckpt": "no_such_dir"}, FileNotFoundError,
                               ["checkpoint directory not found", "no_such_dir"]),
    # Without verification a flipped byte inside a tensor loads unnoticed: what verify_checksums is for.
    "flipped_unverified": ("flipped_shard", {}, None, []),
    "good_verified": ("good", {"verify_checksums": True}, None, []),
    "two_shards_verified": ("two_shards", {"verify_checksums": True}, None, []),
}

# name -> (method, rank 0's keyword arguments, expected exception type, message parts). The other ranks pass a
# valid request (VALID): rank 0's request decides for every rank, so they must raise rank 0's error too.
REQUEST_CASES = {
    "prompt_longer_than_max_seq_len": ("generate", {"prompt_tokens": [[1] * 49], "max_gen_len": 4},
                                       RequestError, ["prompt 0 has 49 tokens", "max_seq_len=48"]),
    "more_prompts_than_max_batch_size": ("generate", {"prompt_tokens": [[1, 2]] * 4, "max_gen_len": 4},
                                         RequestError, ["4 prompts", "max_batch_size=3"]),
    "no_prompts": ("generate", {"prompt_tokens": [], "max_gen_len": 4}, RequestError,
                   ["prompt_tokens must be a non-empty list", "got []"]),
    "empty_prompt": ("generate", {"prompt_tokens": [[1, 2], []], "max_gen_len": 4}, RequestError,
                     ["prompt 1 must be a non-empty list of token ids", "got []"]),
    "negative_token_id": ("generate", {"prompt_tokens": [[1, -1]], "max_gen_len": 4}, RequestError,
                          ["token id -1", "outside the vocabulary [0, 384)"]),
    "token_id_too_large": ("generate", {"prompt_tokens": [[1, 384]], "max_gen_len": 4}, RequestError,
                           ["token id 384", "outside the vocabulary [0, 384)"]),
    "float_token_id": ("generate", {"prompt_tokens": [[1, 2.5]], "max_gen_len": 4}, RequestError,
                       ["prompt 0 holds 2.5 (float)", "not an integer token id"]),
    "str_token_id": ("generate", {"prompt_tokens": [[1, "7"]], "max_gen_len": 4}, RequestError,
                     ["prompt 0 holds '7' (str)", "not an integer token id"]),
    "negative_temperature": ("generate", {"prompt_tokens": GOOD, "max_gen_len": 4, "temperature": -0.1},
                             RequestError, ["temperature must be a finite number >= 0", "got -0.1"]),
    "top_p_zero": ("generate", {"prompt_tokens": GOOD, "max_gen_len": 4, "top_p": 0}, RequestError,
                   ["top_p must be in (0, 1]", "got 0"]),
    "top_p_above_one": ("generate", {"prompt_tokens": GOOD, "max_gen_len": 4, "top_p": 1.5}, RequestError,
                        ["top_p must be in (0, 1]", "got 1.5"]),
    "top_p_negative": ("generate", {"prompt_tokens": GOOD, "max_gen_len": 4, "top_p": -0.5}, RequestError,
                       ["top_p must be in (0, 1]", "got -0.5"]),
    "max_gen_len_zero": ("generate", {"prompt_tokens": GOOD, "max_gen_len": 0}, RequestError,
                         ["max_gen_len must be an integer >= 1", "got 0"]),
    "max_gen_len_negative": ("generate", {"prompt_tokens": GOOD, "max_gen_len": -3}, RequestError,
                             ["max_gen_len must be an integer >= 1", "got -3"]),
    "stream_bad_token_id": ("generate_stream", {"prompt_tokens": [[1, 999]], "max_gen_len": 4}, RequestError,
                            ["token id 999", "[0, 384)"]),
    "text_no_prompts": ("text_completion", {"prompts": []}, RequestError,
                        ["prompts must be a non-empty list of strings", "got []"]),
    "text_too_many_prompts": ("text_completion", {"prompts": ["a"] * 4, "max_gen_len": 2}, RequestError,
                              ["4 prompts", "max_batch_size=3"]),
    "text_prompt_too_long": ("text_completion", {"prompts": ["hello world " * 40], "max_gen_len": 2},
                             RequestError, ["tokens, more than max_seq_len=48"]),
    "text_bad_top_p": ("text_completion", {"prompts": ["hello"], "top_p": 1.5, "max_gen_len": 2}, RequestError,
                       ["top_p must be in (0, 1]", "got 1.5"]),
    "chat_unknown_role": ("chat_completion", {"dialogs": [[{"role": "robot", "content": "hi"}]]}, DialogError,
                          ["message 0 has role 'robot'", "allowed roles are ['assistant', 'system', 'user']"]),
    "chat_no_dialogs": ("chat_completion", {"dialogs": []}, RequestError,
                        ["dialogs must be a non-empty list", "got []"]),
}
VALID = {
    "generate": {"prompt_tokens": GOOD, "max_gen_len": 2},
    "generate_stream": {"prompt_tokens": GOOD, "max_gen_len": 2},
    "text_completion": {"prompts": ["hello"], "max_gen_len": 2},
    "chat_completion": {"dialogs": [[{"role": "user", "content": "hello"}]], "max_gen_len": 2},
}


def _outcome(fn, *args, **kwargs):
    """("ok", result) or ("error", exception type, message): what fn(*args, **kwargs) did on this rank."""
    try:
        return ("ok", fn(*args, **kwargs))
    except Exception as exc:  # noqa: BLE001 - the test inspects type and message
        return ("error", type(exc), str(exc))


def _build(ckpt, tokenizer=None, seed=1, **kwargs):
    tokenizer = tokenizer or os.path.join(ckpt, "tokenizer.model")
    return Llama.build(ckpt, tokenizer, MAX_SEQ_LEN, MAX_BATCH, dtype="float32", seed=seed, **kwargs)


def _built_type(*args, **kwargs) -> str:
    return type(_build(*args, **kwargs)).__name__


def _consumed(stream_method):
    return lambda **kwargs: list(stream_method(**kwargs))


def determinism_outputs(ckpt: str) -> dict:
    """Greedy output; sampled output with a per-rank seed (only rank 0's may count), then again with seed 7."""
    rank = int(os.environ["RANK"])
    llm = _build(ckpt, seed=7 if rank == 0 else 100 + rank)
    torch.manual_seed(rank)  # the global generator must not matter either
    out = {"greedy": llm.generate(PROMPTS, 8, temperature=0)[0],
           "sampled": llm.generate(PROMPTS, 12, temperature=0.8, top_p=0.95)[0]}
    out["sampled_again"] = _build(ckpt, seed=7).generate(PROMPTS, 12, temperature=0.8, top_p=0.95)[0]
    return out


def two_rank_worker(ckpts: dict) -> dict:
    rank = int(os.environ["RANK"])
    init_distributed()
    out = {"determinism": determinism_outputs(ckpts["good"])}

    llm = _build(ckpts["good"])
    baseline = llm.generate(GOOD, 4, temperature=0)[0]
    out["requests"], out["recovered"] = {}, {}
    for name, (method, kwargs, _, _) in REQUEST_CASES.items():
        call = getattr(llm, method)
        if method == "generate_stream":
            call = _consumed(call)
        out["requests"][name] = _outcome(call, **(kwargs if rank == 0 else VALID[method]))
        # The same Llama serves the next good request: no rank was left behind in a collective.
        out["recovered"][name] = llm.generate(GOOD, 4, temperature=0)[0] == baseline

    # Generation stops where the cache ends (max_seq_len), per sequence; max_gen_len still caps the short one.
    out["truncated"] = llm.generate([[1] * 45, [1, 2]], 10, temperature=0)[0]
    out["truncated_echo"] = llm.generate([[1] * 45], 10, temperature=0, echo=True)[0]
    # max_gen_len=None means max_seq_len - 1: more than any prompt leaves room for, so always truncated.
    out["truncated_text"] = llm.text_completion(["hello " * 10], temperature=0, logprobs=True)
    out["truncated_text_prompt"] = len(llm.tokenizer.encode("hello " * 10, bos=True, eos=False))

    out["builds"] = {}
    for name, (subdir, kwargs, _, _) in BUILD_CASES.items():
        kwargs = dict(kwargs)
        tokenizer = kwargs.pop("tokenizer_path", None)
        rank1_dir = kwargs.pop("rank1_ckpt", None)
        ckpt = os.path.join(ckpts["root"], rank1_dir if rank1_dir and rank == 1 else subdir)
        tokenizer = os.path.join(ckpts["root"], tokenizer or "good/tokenizer.model")
        out["builds"][name] = _outcome(_built_type, ckpt, tokenizer, **kwargs)
    out["after_builds"] = llm.generate(GOOD, 4, temperature=0)[0] == baseline
    return out


@pytest.fixture(scope="module")
def two_ranks(ckpts):
    return run_local(two_rank_worker, 2, ckpts, timeout_s=180)


def _same_on_every_rank(per_rank: list, key: str, name: str):
    outcomes = [r[key][name] for r in per_rank]
    assert all(o == outcomes[0] for o in outcomes), f"{name}: ranks disagree: {outcomes}"
    return outcomes[0]


def _assert_error(outcome, exc_type, parts) -> None:
    """`outcome` (from _outcome) is an `exc_type` error whose message contains every one of `parts`."""
    assert outcome[:2] == ("error", exc_type), outcome
    for part in parts:
        assert part in outcome[2], (part, outcome[2])


@pytest.mark.parametrize("name", REQUEST_CASES)
def test_bad_request_raises_the_same_named_error_on_every_rank(two_ranks, name):
    _, _, exc_type, parts = REQUEST_CASES[name]
    outcome = _same_on_every_rank(two_ranks, "requests", name)
    _assert_error(outcome, exc_type, parts)


@pytest.mark.parametrize("name", REQUEST_CASES)
def test_llama_still_serves_after_a_bad_request(two_ranks, name):
    assert all(r["recovered"][name] for r in two_ranks)


@pytest.mark.parametrize("name", BUILD_CASES)
def test_bad_checkpoint_raises_the_same_named_error_on_every_rank(two_ranks, name):
    _, _, exc_type, parts = BUILD_CASES[name]
    outcome = _same_on_every_rank(two_ranks, "builds", name)
    if exc_type is None:
        assert outcome == ("ok", "Llama"), outcome
        return
    _assert_error(outcome, exc_type, parts)


def test_checksum_error_names_both_md5s(ckpts, two_ranks):
    shard = os.path.join(ckpts["root"], "flipped_shard", "consolidated.00.pth")
    listed = read_checklist(os.path.join(ckpts["root"], "flipped_shard"))["consolidated.00.pth"]
    message = two_ranks[0]["builds"]["checksum_mismatch"][2]
    assert listed in message and file_md5(shard) in message and listed != file_md5(shard)


def test_malicious_checkpoint_never_runs_its_code(ckpts, two_ranks):
    assert two_ranks[0]["builds"]["malicious_shard"][0] == "error"
    assert not os.path.exists(ckpts["marker"])


def test_builds_that_failed_leave_the_group_usable(two_ranks):
    assert all(r["after_builds"] for r in two_ranks)


def test_generation_is_truncated_at_max_seq_len(two_ranks):
    for r in two_ranks:
        assert r["truncated"] == two_ranks[0]["truncated"]
        assert [len(t) for t in r["truncated"]] == [MAX_SEQ_LEN - 45, 10]
        assert len(r["truncated_echo"][0]) == MAX_SEQ_LEN
        assert r["truncated_text"] == two_ranks[0]["truncated_text"]
        assert 0 < len(r["truncated_text"][0]["tokens"]) <= MAX_SEQ_LEN - r["truncated_text_prompt"]


# ---- 3 ranks: shapes and shard counts the world size cannot split --------------------------------------------

THREE_RANK_CASES = {
    "heads_not_divisible": ("good", ConfigError, ["good/params.json", "n_heads=4", "world size 3"]),
    "two_shards_on_three_ranks": ("heads6_2_shards", CheckpointError, ["2 shard(s)", "3 rank(s)"]),
    "four_shards_on_three_ranks": ("heads6_4_shards", CheckpointError, ["4 shard(s)", "3 rank(s)"]),
}


def three_rank_worker(ckpts: dict) -> dict:
    out = {"builds": {}}
    for name, (subdir, _, _) in THREE_RANK_CASES.items():
        out["builds"][name] = _outcome(_built_type, os.path.join(ckpts["root"], subdir))
    out["greedy"] = _build(ckpts["heads6"]).generate(PROMPTS, 8, temperature=0)[0]
    return out


def one_rank_worker(ckpts: dict) -> dict:
    return {"heads4": determinism_outputs(ckpts["good"]),
            "heads6": _build(ckpts["heads6"]).generate(PROMPTS, 8, temperature=0)[0]}


def four_rank_worker(ckpts: dict) -> dict:
    return determinism_outputs(ckpts["good"])


@pytest.fixture(scope="module")
def three_ranks(ckpts):
    return run_local(three_rank_worker, 3, ckpts, timeout_s=120)


@pytest.fixture(scope="module")
def one_rank(ckpts):
    return run_local(one_rank_worker, 1, ckpts, timeout_s=120)[0]


@pytest.mark.parametrize("name", THREE_RANK_CASES)
def test_world_size_errors_on_every_rank(three_ranks, name):
    _, exc_type, parts = THREE_RANK_CASES[name]
    outcome = _same_on_every_rank(three_ranks, "builds", name)
    _assert_error(outcome, exc_type, parts)


def test_three_ranks_generate_what_one_rank_does(three_ranks, one_rank):
    assert all(r["greedy"] == one_rank["heads6"] for r in three_ranks)


# ---- determinism across world sizes ---------------------------------------------------------------------------


def test_greedy_output_is_the_same_at_world_sizes_1_2_4(ckpts, one_rank, two_ranks):
    four = run_local(four_rank_worker, 4, ckpts, timeout_s=180)
    expected = one_rank["heads4"]["greedy"]
    assert all(len(t) == 8 for t in expected)
    for world, per_rank in ((2, [r["determinism"] for r in two_ranks]), (4, four)):
        for rank, out in enumerate(per_rank):
            assert out["greedy"] == expected, (world, rank)
            # Sampling: every rank holds rank 0's choice whatever its own seed, and the seed reproduces it.
            assert out["sampled"] == per_rank[0]["sampled"], (world, rank)
            assert out["sampled_again"] == per_rank[0]["sampled"], (world, rank)
    assert one_rank["heads4"]["sampled_again"] == one_rank["heads4"]["sampled"]


# ---- in this process: checklist parsing and the timeout setting ------------------------------------------------


def test_verify_checklist_hashes_every_listed_file_once_across_parts(ckpts):
    good = ckpts["good"]
    assert verify_checklist(good) == 2  # params.json and consolidated.00.pth
    assert sum(verify_checklist(good, part=p, parts=3) for p in range(3)) == 2


@pytest.mark.parametrize(
    "lines, parts",
    [
        (["d41d8cd98f00b204e9800998ecf8427e  params.json"], ["params.json has md5"]),
        (["not-an-md5  params.json"], ["line 1", "is not '<md5>  <file name>'"]),
        (["d41d8cd98f00b204e9800998ecf8427e  ../params.json"], ["line 1 names '../params.json'"]),
        (["d41d8cd98f00b204e9800998ecf8427e  absent.pth"], ["absent.pth is listed in", "but missing"]),
    ],
    ids=["wrong-md5", "malformed-line", "outside-the-dir", "listed-but-absent"],
)
def test_verify_checklist_names_the_bad_entry(ckpts, tmp_path, lines, parts):
    ckpt = copy_of(ckpts["good"], tmp_path / "ckpt")
    good_lines = (ckpt / "checklist.chk").read_text().splitlines()
    (ckpt / "checklist.chk").write_text("\n".join(lines + good_lines[1:]) + "\n")  # replaces params.json's line
    with pytest.raises(CheckpointError) as info:
        verify_checklist(ckpt)
    for part in parts:
        assert part in str(info.value), (part, str(info.value))


def test_verify_checklist_accepts_md5sum_binary_marker_and_upper_case(ckpts, tmp_path):
    ckpt = copy_of(ckpts["good"], tmp_path / "ckpt")
    lines = [f"{md5.upper()} *{name}" for name, md5 in read_checklist(ckpt).items()]
    (ckpt / "checklist.chk").write_text("\n".join(lines) + "\n\n")
    assert verify_checklist(ckpt) == 2


def test_verify_checklist_refuses_an_unlisted_shard(ckpts, tmp_path):
    ckpt = copy_of(ckpts["good"], tmp_path / "ckpt")
    write_checklist(ckpt, ["params.json"])
    with pytest.raises(CheckpointError, match="consolidated.00.pth is not listed in"):
        verify_checklist(ckpt)


def test_timeout_defaults_to_600_s_and_reads_llama_dist_timeout(monkeypatch):
    monkeypatch.delenv("LLAMA_DIST_TIMEOUT", raising=False)
    assert default_timeout_s() == DEFAULT_TIMEOUT_S == 600
    monkeypatch.setenv("LLAMA_DIST_TIMEOUT", "12.5")
    assert default_timeout_s() == 12.5
    for bad in ("ten", "0", "-5", "inf", "nan"):
        monkeypatch.setenv("LLAMA_DIST_TIMEOUT", bad)
        with pytest.raises(ValueError, match=f"LLAMA_DIST_TIMEOUT must be a positive number of seconds, got '{bad}'"):
            default_timeout_s()


def test_bad_timeout_argument_is_refused_before_any_group_starts():
    with pytest.raises(ValueError, match="timeout_s must be a positive number of seconds, got 0"):
        init_distributed(timeout_s=0)
