"""Llama.build / generate / completions / streaming on real gloo ranks with random models: Meta's semantics,
the same result on every rank and world size, and one named error on every rank for a bad checkpoint or
request (after which the Llama keeps serving).

Launches are few and batched: one worker per world size runs all of its cases and returns each case's outcome,
(exception type, message) or the output, per rank.
"""

import os
import shlex
import shutil
import time

import pytest
import torch
from helpers import SPM_VOCAB, RunsShellCommand, shorten_storage_record, tiny_args, write_checkpoint

from llama_dist.checkpoint.checklist import file_md5, read_checklist
from llama_dist.dist.groups import RemoteRankError
from llama_dist.dist.local_launch import run_local
from llama_dist.errors import CheckpointError, ConfigError, DialogError, PromptTooLongError, RequestError
from llama_dist.llm import Llama

VOCAB = SPM_VOCAB
MAX_SEQ_LEN, MAX_BATCH = 48, 3
PROMPTS = [[1, 17, 42, 99, 7, 250], [1, 5], [1, 300, 301, 302]]
GOOD = [[1, 20, 30]]  # the request that must still work after every failed one
HEADS4 = tiny_args(vocab_size=VOCAB, n_kv_heads=2)  # 4 heads, 2 KV heads: runs on 1, 2 and 4 ranks
HEADS6 = tiny_args(vocab_size=VOCAB, dim=96, n_heads=6, n_kv_heads=6, multiple_of=48)  # runs on 1, 2, 3, 6


# ---- files -------------------------------------------------------------------------------------------------


def write_checklist(ckpt_dir) -> None:
    names = ["params.json"] + sorted(p.name for p in ckpt_dir.glob("consolidated.*.pth"))
    (ckpt_dir / "checklist.chk").write_text("".join(f"{file_md5(ckpt_dir / n)}  {n}\n" for n in names))


def copy_of(src, dst):
    shutil.copytree(src, dst)
    return dst


def flip_bytes(path, offset: int, count: int = 16) -> None:
    """Corrupt `count` bytes in the middle of a tensor's data: torch.load does not notice, md5 does."""
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = bytes(b ^ 0xFF for b in data[offset : offset + count])
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, spm_model_path) -> dict:
    """Good checkpoints and one broken copy per build case; each dir holds its tokenizer.model."""
    root = tmp_path_factory.mktemp("gen")
    good = root / "good"
    write_checkpoint(good, HEADS4, seed=11)
    shutil.copy(spm_model_path, good / "tokenizer.model")
    write_checklist(good)
    heads6 = root / "heads6"
    write_checkpoint(heads6, HEADS6, seed=12)
    shutil.copy(spm_model_path, heads6 / "tokenizer.model")
    paths = {"good": good, "heads6": heads6, "root": root, "marker": root / "pwned"}

    two = root / "two_shards"
    write_checkpoint(two, HEADS4, num_shards=2, seed=11)
    shutil.copy(spm_model_path, two / "tokenizer.model")
    write_checklist(two)
    (copy_of(two, root / "last_shard_missing") / "consolidated.01.pth").unlink()
    vocab = copy_of(good, root / "vocab_mismatch")
    params = (vocab / "params.json").read_text()
    (vocab / "params.json").write_text(params.replace(f'"vocab_size": {VOCAB}', '"vocab_size": 512'))
    shard = copy_of(good, root / "truncated_shard") / "consolidated.00.pth"
    os.truncate(shard, shard.stat().st_size // 2)
    shard = copy_of(good, root / "flipped_shard") / "consolidated.00.pth"
    flip_bytes(shard, shard.stat().st_size // 2)
    (copy_of(good, root / "no_checklist") / "checklist.chk").unlink()

    evil = copy_of(good, root / "malicious_shard")
    payload = torch.load(evil / "consolidated.00.pth", weights_only=True)
    payload["exploit"] = RunsShellCommand(f"touch {shlex.quote(str(paths['marker']))}")
    torch.save(payload, evil / "consolidated.00.pth")

    # Hostile or corrupt files that torch.load(mmap=True) accepts: a storage record shorter than its tensor (which
    # would read its neighbour's bytes), and a shard copied over another (right shapes, wrong weights).
    shorten_storage_record(copy_of(good, root / "short_record") / "consolidated.00.pth", "0")
    repeated = copy_of(two, root / "repeated_shard")
    shutil.copy(repeated / "consolidated.00.pth", repeated / "consolidated.01.pth")
    # Weights that make every logit NaN: generation must say so instead of decoding garbage.
    nan = copy_of(good, root / "nan_weights")
    weights = torch.load(nan / "consolidated.00.pth", weights_only=True)
    weights["norm.weight"][:] = float("nan")
    torch.save(weights, nan / "consolidated.00.pth")
    paths["nan_weights"] = nan

    for shards in (2, 4):  # neither divides nor is a multiple of 3 ranks
        write_checkpoint(root / f"heads6_{shards}_shards", HEADS6, num_shards=shards)
        shutil.copy(spm_model_path, root / f"heads6_{shards}_shards" / "tokenizer.model")
    return {k: str(v) for k, v in paths.items()}


def _build(ckpt, tokenizer=None, seed=1, **kwargs):
    tokenizer = tokenizer or os.path.join(ckpt, "tokenizer.model")
    return Llama.build(ckpt, tokenizer, MAX_SEQ_LEN, MAX_BATCH, dtype="float32", seed=seed, **kwargs)


# ---- Meta's generate semantics at 1 and 2 ranks --------------------------------------------------------------

class _StopAt:
    """The real tokenizer with one more stop token."""

    def __init__(self, tokenizer, extra_stop):
        self._tok, self.stop_tokens = tokenizer, list(tokenizer.stop_tokens) + [extra_stop]

    def __getattr__(self, name):
        return getattr(self._tok, name)


class _EndsInsideACharacter:
    """The real tokenizer, except that text ending in one of `partial` (each prompt's 6th generated token) ends in
    a partial character (U+FFFD): as a byte token starting a multi-byte character decodes, whatever precedes it
    (the streaming detokenizer decodes short windows, not the whole output)."""

    def __init__(self, tokenizer, partial):
        self._tok, self._partial = tokenizer, set(partial)

    def decode(self, ids):
        return self._tok.decode(ids) + ("\ufffd" if ids and ids[-1] in self._partial else "")

    def __getattr__(self, name):
        return getattr(self._tok, name)


def generation_worker(ckpts: dict) -> dict:
    llm = _build(ckpts["good"])
    out = {}
    out["batch"], out["batch_logprobs"] = llm.generate(PROMPTS, 8, temperature=0, logprobs=True)
    out["alone"] = [llm.generate([p], 8, temperature=0)[0][0] for p in PROMPTS]
    out["echo"], out["echo_logprobs"] = llm.generate(PROMPTS[:1], 4, temperature=0, logprobs=True, echo=True)
    # The log-softmax of one plain forward over the echoed sequence, to compare logprobs with.
    seq = torch.tensor([out["echo"][0]])
    out["plain_logits"] = llm.model(seq, 0).logits[0]

    stop = out["alone"][0][2]  # stop at the third token greedy decoding produces for prompt 0
    llm.tokenizer = _StopAt(llm.tokenizer, stop)
    out["stopped"] = llm.generate(PROMPTS, 8, temperature=0)[0]
    llm.tokenizer = llm.tokenizer._tok

    out["stream"] = [(s.tokens, s.texts) for s in llm.generate_stream(PROMPTS, 6, temperature=0)]
    llm.tokenizer = _EndsInsideACharacter(llm.tokenizer, [a[5] for a in out["alone"]])
    out["stream_partial"] = [s.texts for s in llm.generate_stream(PROMPTS, 6, temperature=0)]
    out["stream_expected_text"] = [llm.tokenizer.decode(a[:6]) for a in out["alone"]]
    llm.tokenizer = llm.tokenizer._tok
    out["text"] = llm.text_completion(["one two three", "hello"], temperature=0, max_gen_len=5, logprobs=True)
    out["chat"] = llm.chat_completion([[{"role": "user", "content": "hello"}]], temperature=0, max_gen_len=5)
    # Generation stops where the cache ends (max_seq_len), per sequence; max_gen_len still caps the short one.
    out["truncated"] = llm.generate([[1] * 45, [1, 2]], 10, temperature=0)[0]
    out["truncated_echo"] = llm.generate([[1] * 45], 10, temperature=0, echo=True)[0]
    # max_gen_len=None means max_seq_len - 1: more than any prompt leaves room for, so always truncated.
    out["truncated_text"] = llm.text_completion(["hello " * 10], temperature=0, logprobs=True)
    out["truncated_text_prompt"] = len(llm.tokenizer.encode("hello " * 10, bos=True, eos=False))
    # A temperature so small that dividing by it overflows: still greedy, not a crash.
    out["coldest"] = llm.generate(PROMPTS, 8, temperature=1e-300)[0]
    broken = _build(ckpts["nan_weights"])
    out["non_finite"] = [_outcome(broken.generate, PROMPTS, 4, temperature=t) for t in (0, 0.8)]
    out["non_finite_stream"] = _outcome(_consumed(broken.generate_stream), prompt_tokens=PROMPTS, max_gen_len=4)
    return out


@pytest.fixture(scope="module")
def results(ckpts):
    return {n: run_local(generation_worker, n, ckpts, timeout_s=240) for n in (1, 2)}


@pytest.mark.parametrize("world_size", [1, 2])
def test_every_rank_returns_the_same(results, world_size):
    ranks = results[world_size]
    for other in ranks[1:]:
        for key in ("batch", "batch_logprobs", "alone", "stopped", "stream", "text", "chat", "truncated",
                    "truncated_echo", "truncated_text"):
            assert other[key] == ranks[0][key], key


@pytest.mark.parametrize("world_size", [1, 2])
def test_ragged_greedy_batch_equals_each_prompt_alone(results, world_size):
    out = results[world_size][0]
    assert out["batch"] == out["alone"]
    assert all(len(t) == 8 for t in out["batch"])  # no stop token in a random model's first 8
    assert results[world_size][0]["batch"] == results[1][0]["batch"]


@pytest.mark.parametrize("world_size", [1, 2])
def test_logprobs_are_log_softmax_of_a_plain_forward(results, world_size):
    out = results[world_size][0]
    seq = out["echo"][0]
    expected = torch.log_softmax(out["plain_logits"], dim=-1)[torch.arange(len(seq) - 1), torch.tensor(seq[1:])]
    got = torch.tensor(out["echo_logprobs"][0][1:])
    assert torch.allclose(got, expected, atol=1e-4)
    assert out["echo_logprobs"][0][0] == 0.0  # nothing predicts the first token
    for tokens, logprobs in zip(out["batch"], out["batch_logprobs"]):
        assert len(tokens) == len(logprobs)


@pytest.mark.parametrize("world_size", [1, 2])
def test_non_finite_logits_are_one_named_error_on_every_rank(results, world_size):
    for out in results[world_size]:
        for outcome in out["non_finite"] + [out["non_finite_stream"]]:
            _assert_error(outcome, CheckpointError, ["the model produced non-finite logits (NaN or inf)"])


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_vanishing_temperature_is_greedy(results, world_size):
    for out in results[world_size]:
        assert out["coldest"] == out["batch"]  # the greedy tokens of the same prompts


def test_echo_returns_prompt_then_generation(results):
    out = results[1][0]
    assert out["echo"][0] == PROMPTS[0] + out["alone"][0][:4]


@pytest.mark.parametrize("world_size", [1, 2])
def test_stop_token_ends_only_its_sequence(results, world_size):
    out = results[world_size][0]
    assert out["stopped"][0] == out["alone"][0][:2]  # stop token excluded
    for got, full in zip(out["stopped"][1:], out["alone"][1:]):
        assert full[: len(got)] == got


def test_stream_yields_the_generated_tokens_and_text(results):
    out = results[2][0]
    streamed = [[t for tokens, _ in out["stream"] if (t := tokens[i]) is not None] for i in range(len(PROMPTS))]
    assert streamed == [a[:6] for a in out["alone"]]
    # The pieces add up to the whole text, also when it ends inside a character (held back, then sent at the end).
    texts = ["".join(texts[i] for texts in out["stream_partial"]) for i in range(len(PROMPTS))]
    assert texts == out["stream_expected_text"] and all(text.endswith("\ufffd") for text in texts)


def test_text_and_chat_completion_shapes(results):
    out = results[2][0]
    assert len(out["text"]) == 2
    for item in out["text"]:
        assert isinstance(item["generation"], str)
        assert len(item["tokens"]) == len(item["logprobs"]) <= 5
    assert out["chat"][0]["generation"]["role"] == "assistant"
    assert isinstance(out["chat"][0]["generation"]["content"], str)


@pytest.mark.parametrize("world_size", [1, 2])
def test_generation_is_truncated_at_max_seq_len(results, world_size):
    out = results[world_size][0]
    assert [len(t) for t in out["truncated"]] == [MAX_SEQ_LEN - 45, 10]
    assert len(out["truncated_echo"][0]) == MAX_SEQ_LEN
    assert 0 < len(out["truncated_text"][0]["tokens"]) <= MAX_SEQ_LEN - out["truncated_text_prompt"]


# ---- bad checkpoints and requests: the same named error on every rank, at 2 ranks -----------------------------------------------------------------

# name -> (ckpt dir under root, build kwargs, expected exception type or None for "loads", message parts)
BUILD_CASES = {
    "missing_dir": ("no_such_dir", {}, FileNotFoundError, ["checkpoint not found", "no_such_dir"]),
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
    "malicious_shard": ("malicious_shard", {}, CheckpointError, ["consolidated.00.pth", "refused to unpickle"]),
    "checksum_mismatch": ("flipped_shard", {"verify_checksums": True}, CheckpointError,
                          ["flipped_shard/consolidated.00.pth has md5", "but", "checklist.chk says"]),
    "no_checklist": ("no_checklist", {"verify_checksums": True}, CheckpointError,
                     ["cannot verify checksums", "no_checklist/checklist.chk not found"]),
    "missing_on_rank_1_only": ("good", {"rank1_ckpt": "no_such_dir"}, FileNotFoundError,
                               ["checkpoint not found", "no_such_dir"]),
    "short_storage_record": ("short_record", {}, CheckpointError,
                             ["short_record/consolidated.00.pth", "declares", "bytes of storage but the file has"]),
    "repeated_shard": ("repeated_shard", {}, CheckpointError,
                       ["consolidated.01.pth repeats consolidated.00.pth", "tok_embeddings.weight"]),
    # Without verification a flipped byte inside a tensor loads unnoticed: what verify_checksums is for.
    "flipped_unverified": ("flipped_shard", {}, None, []),
    "good_verified": ("good", {"verify_checksums": True}, None, []),
    "two_shards_verified": ("two_shards", {"verify_checksums": True}, None, []),
}

# name -> (method, rank 0's keyword arguments, expected exception type, message parts). The other ranks pass a
# valid request (VALID): rank 0's request decides for every rank, so they must raise rank 0's error too.
REQUEST_CASES = {
    "prompt_longer_than_max_seq_len": ("generate", {"prompt_tokens": [[1] * 49], "max_gen_len": 4},
                                       PromptTooLongError, ["prompt 0 has 49 tokens", "max_seq_len=48"]),
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
                             PromptTooLongError, ["tokens, more than max_seq_len=48"]),
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

    out["builds"] = {}
    for name, (subdir, kwargs, _, _) in BUILD_CASES.items():
        kwargs = dict(kwargs)
        tokenizer = kwargs.pop("tokenizer_path", None)
        rank1_dir = kwargs.pop("rank1_ckpt", None)
        ckpt = os.path.join(ckpts["root"], rank1_dir if rank1_dir and rank == 1 else subdir)
        tokenizer = os.path.join(ckpts["root"], tokenizer or "good/tokenizer.model")
        out["builds"][name] = _outcome(_built_type, ckpt, tokenizer, **kwargs)
    out["after_builds"] = llm.generate(GOOD, 4, temperature=0)[0] == baseline

    # Rank 0's sampling fails at the third step (a bug, a device error): every rank must end at once, not wait
    # for a token that never comes until the timeout.
    sampler = llm.engine.sampler
    if rank == 0:
        sampled = {"steps": 0}

        def failing_sampler(*args):
            sampled["steps"] += 1
            if sampled["steps"] == 3:
                raise ZeroDivisionError("sampling broke")
            return sampler(*args)

        llm.engine.sampler = failing_sampler
    started = time.monotonic()
    out["rank0_failure"] = _outcome(llm.generate, GOOD, 8, temperature=0)
    out["rank0_failure_s"] = time.monotonic() - started
    llm.engine.sampler = sampler
    out["after_rank0_failure"] = llm.generate(GOOD, 4, temperature=0)[0] == baseline
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


def test_rank0_failing_inside_the_decode_loop_ends_every_rank_at_once(two_ranks):
    assert two_ranks[0]["rank0_failure"] == ("error", ZeroDivisionError, "sampling broke")
    _assert_error(two_ranks[1]["rank0_failure"], RemoteRankError, ["rank 0 failed"])
    assert all(r["rank0_failure_s"] < 30 for r in two_ranks)  # the group timeout in these tests is 600 s
    assert all(r["after_rank0_failure"] for r in two_ranks)


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
