"""Hugging Face checkpoints (formats/hf.py): directories saved by transformers load at 1, 2, 3 and 4 ranks and give
transformers' logits and greedy tokens; a rank's resident weights shrink with the world size; `convert` moves a
checkpoint between the two layouts and back byte for byte.

Every checkpoint is made here with `LlamaForCausalLM(LlamaConfig(...)).save_pretrained`; the reference is
transformers itself, run in this process on the same directory in float32.
"""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch
from helpers import raises_naming, reference_logits, rel_diff, tiny_args, write_checkpoint

from llama_dist.checkpoint.consolidated import ConsolidatedReader
from llama_dist.checkpoint.convert import convert
from llama_dist.checkpoint.formats import open_reader
from llama_dist.checkpoint.hf import HuggingFaceReader, args_from_hf_config, rotary_rows_from_hf, rotary_rows_to_hf
from llama_dist.checkpoint.loader import load_model, open_checkpoint
from llama_dist.cli import main as cli_main
from llama_dist.config import ModelArgs
from llama_dist.dist.groups import init_distributed
from llama_dist.dist.local_launch import run_local
from llama_dist.errors import CheckpointError, ConfigError
from llama_dist.model.weights import weight_shapes

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

TOKENS = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(11))
GREEDY_STEPS = 6
MAX_SEQ_LEN = 48

BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
            vocab_size=96, rms_norm_eps=1e-5, max_position_embeddings=128)
# name -> (config, save_pretrained dtype, save_pretrained kwargs, world sizes the heads allow)
CASES = {
    # 2 KV heads: replicated at 4 ranks; intermediate_size 96 is not what Meta's rounding rule gives (192).
    "gqa": (dict(BASE), torch.float32, {}, (1, 2, 4)),
    "tied": (dict(BASE, tie_word_embeddings=True), torch.float32, {}, (1, 2, 4)),
    # Scaling reaches positions this short only with a short original context: factor 32 then shows in the logits.
    "rope_llama3_32": (
        dict(BASE, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 16}),
        torch.float32, {}, (1, 2, 4),
    ),
    "sharded_index": (dict(BASE), torch.float32, {"max_shard_size": "100KB"}, (1, 2, 4)),
    "bf16": (dict(BASE), torch.bfloat16, {}, (1, 2, 4)),
    "head_dim_32": (dict(BASE, head_dim=32), torch.float32, {}, (1, 2, 4)),
    # One KV head for six query heads: 3 ranks.
    "mqa_6_heads": (dict(BASE, hidden_size=96, num_attention_heads=6, num_key_value_heads=1, intermediate_size=144),
                    torch.float32, {}, (1, 2, 3)),
}
# A checkpoint large enough for resident memory to show the split (~67 MB of float32 weights).
RSS_CONFIG = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=1536, vocab_size=4096, rms_norm_eps=1e-5, max_position_embeddings=128)


def save_hf(path, config: dict, dtype=torch.float32, seed: int = 0, **save_kwargs):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config)).to(dtype)
    with torch.no_grad():
        # transformers' init (std 0.02) leaves attention nearly uniform, blind to positions: scale matrices so
        # activations keep their size through the layers, and make norm gains near 1 but not 1.
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(torch.randn_like(param) * param.shape[-1] ** -0.5)
    model.save_pretrained(path, **save_kwargs)
    return path


def transformers_reference(path, tokens: torch.Tensor, steps: int = GREEDY_STEPS):
    """transformers' float32 logits for `tokens` and its greedy continuation, from the directory at `path`."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(tokens).logits.float()
        seq = tokens
        for _ in range(steps):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return logits, seq[:, tokens.shape[1]:]


# ---- the rank workers: every case of one world size in one launch -------------------------------------------


class _Stderr(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def _peak_load_bytes(path, warm_up) -> int:
    """How far this process's resident memory peaks above where it was while it loads `path`, once a first load
    (of `warm_up`) has paid the one-time costs (modules torch imports on first use of the meta device, ...)."""
    load_model(warm_up, max_seq_len=MAX_SEQ_LEN, max_batch_size=2)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the peak) to the current resident size
    before = _status_kib("VmRSS")
    model = load_model(path, max_seq_len=MAX_SEQ_LEN, max_batch_size=2)
    peak = _status_kib("VmHWM")
    del model
    return (peak - before) * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def hf_worker(jobs: dict, rss_ckpt: str | None, warm_up: str) -> dict:
    """On each rank: the peak resident growth while loading rss_ckpt (first, in a fresh process), then for every
    job its error, or its logits for TOKENS and greedy tokens (prefill, then decode through the KV cache), and
    what loading wrote to stdout and to stderr (a terminal or not)."""
    init_distributed()
    results = {"rss": _peak_load_bytes(rss_ckpt, warm_up) if rss_ckpt else None}
    for name, job in jobs.items():
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = io.StringIO(), _Stderr(job.get("tty", False))
        try:
            model = load_model(job["path"], max_seq_len=MAX_SEQ_LEN, max_batch_size=2)
        except Exception as exc:  # noqa: BLE001 - the test inspects the type
            results[name] = {"error": type(exc), "message": str(exc)}
            continue
        finally:
            stdout, stderr = sys.stdout.getvalue(), sys.stderr.getvalue()
            sys.stdout, sys.stderr = saved
        logits = model(TOKENS, 0).logits
        generated, last = [], logits[:, -1]
        for step in range(GREEDY_STEPS):
            token = last.argmax(-1, keepdim=True)
            generated.append(token)
            last = model(token, TOKENS.shape[1] + step).logits[:, -1]
        results[name] = {"logits": logits, "greedy": torch.cat(generated, dim=1), "stdout": stdout, "stderr": stderr,
                         "args": model.args, "output_is_embedding": model.output.weight is model.tok_embeddings.weight}
    return results


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    made = {}
    for i, (name, (config, dtype, save_kwargs, _)) in enumerate(CASES.items()):
        path = save_hf(root / name, config, dtype, seed=i, **save_kwargs)
        logits, greedy = transformers_reference(path, TOKENS)
        made[name] = {"path": str(path), "logits": logits, "greedy": greedy}
    made["rss"] = str(save_hf(root / "rss", RSS_CONFIG, seed=99))
    # Errors: a shape that contradicts config.json, a tensor the model has no place for.
    wrong = save_hf(root / "wrong_shape", BASE, seed=1)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps(dict(config, intermediate_size=128)))
    extra = save_hf(root / "extra_tensor", BASE, seed=2)
    tensors = safetensors_torch.load_file(extra / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    safetensors_torch.save_file(tensors, extra / "model.safetensors", metadata={"format": "pt"})
    made["errors"] = {"wrong_shape": str(wrong), "extra_tensor": str(extra)}
    return made


@pytest.fixture(scope="module")
def results(checkpoints):
    """world size -> rank -> job -> result."""
    out = {}
    for world in (1, 2, 3, 4):
        jobs = {name: {"path": checkpoints[name]["path"]} for name, case in CASES.items() if world in case[3]}
        if world in (1, 2):
            jobs["progress_tty"] = {"path": checkpoints["gqa"]["path"], "tty": True}
            jobs.update({name: {"path": path} for name, path in checkpoints["errors"].items()})
        out[world] = run_local(hf_worker, world, jobs, checkpoints["rss"] if world in (1, 2) else None,
                               checkpoints["gqa"]["path"], timeout_s=240)
    return out


WORLD_CASES = [(name, world) for name, case in CASES.items() for world in case[3]]


@pytest.mark.parametrize("name, world", WORLD_CASES)
def test_logits_and_greedy_tokens_match_transformers(checkpoints, results, name, world):
    reference = checkpoints[name]
    for rank, per_rank in enumerate(results[world]):
        result = per_rank[name]
        assert "error" not in result, result.get("message")
        assert rel_diff(result["logits"], reference["logits"]) <= 1e-5, (name, world, rank)
        assert torch.equal(result["greedy"], reference["greedy"]), (name, world, rank)


def test_config_json_fields_reach_the_model(results):
    got = {name: results[2][0][name]["args"] for name in CASES}
    assert got["rope_llama3_32"].use_scaled_rope and got["rope_llama3_32"].rope_scaling_factor == 32.0
    assert (got["rope_llama3_32"].rope_original_context, got["rope_llama3_32"].rope_theta) == (16, 500000.0)
    assert got["head_dim_32"].head_dim == 32 and got["gqa"].head_dim == 16
    assert got["gqa"].ffn_hidden_dim == 96 and got["mqa_6_heads"].ffn_hidden_dim == 144
    assert got["tied"].tie_word_embeddings and results[2][0]["tied"]["output_is_embedding"]
    assert not results[2][0]["gqa"]["output_is_embedding"]


def test_rope_factor_32_is_not_8(tmp_path, checkpoints):
    """The rope case can fail: with Meta's factor of 8 the same weights give other logits."""
    path = checkpoints["rope_llama3_32"]["path"]
    config = json.loads(open(f"{path}/config.json").read())
    rope = config.get("rope_parameters") or config["rope_scaling"]
    assert rope["factor"] == 32.0
    (tmp_path / "factor8").mkdir()
    rope8 = dict(rope, factor=8.0)
    config8 = dict(config, **({"rope_parameters": rope8} if "rope_parameters" in config else {"rope_scaling": rope8}))
    (tmp_path / "factor8" / "config.json").write_text(json.dumps(config8))
    (tmp_path / "factor8" / "model.safetensors").symlink_to(f"{path}/model.safetensors")
    logits8, _ = transformers_reference(tmp_path / "factor8", TOKENS, steps=0)
    assert rel_diff(logits8, checkpoints["rope_llama3_32"]["logits"]) > 1e-2


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize(
    "job, exc_type, names",
    [
        ("wrong_shape", CheckpointError,
         ["model.layers.0.mlp.gate_proj.weight", "(96, 64)", "(128, 64)", "config.json"]),
        ("extra_tensor", CheckpointError, ["extra_tensor", "model.layers.0.self_attn.q_proj.bias"]),
    ],
)
def test_checkpoint_errors_are_named_on_every_rank(results, world, job, exc_type, names):
    for per_rank in results[world]:
        result = per_rank[job]
        assert result.get("error") is exc_type, result
        for name in names:
            assert name in result["message"], (name, result["message"])


def test_rank_memory_shrinks_with_the_world_size(results):
    one = results[1][0]["rss"]
    two = max(per_rank["rss"] for per_rank in results[2])
    print(f"\npeak resident growth while loading: 1 rank {one / 2**20:.1f} MiB, 2 ranks {two / 2**20:.1f} MiB per rank")
    assert one > 50 * 2**20  # the whole ~67 MB checkpoint is resident at 1 rank
    assert two <= 0.6 * one


@pytest.mark.parametrize("world", [1, 2])
def test_loading_progress(results, world):
    """Not a terminal: one line on stdout, nothing on stderr (kept for errors). A terminal: a bar on stderr."""
    rank0 = results[world][0]
    assert rank0["gqa"]["stdout"].count("\n") == 1 and rank0["gqa"]["stdout"].startswith("Read 21 tensors (")
    assert rank0["gqa"]["stderr"] == ""
    assert "Loading gqa" in rank0["progress_tty"]["stderr"] and "100%" in rank0["progress_tty"]["stderr"]
    assert rank0["progress_tty"]["stdout"] == ""
    for per_rank in results[world][1:]:  # only rank 0 reports
        assert per_rank["gqa"]["stdout"] + per_rank["gqa"]["stderr"] == ""
        assert per_rank["progress_tty"]["stdout"] + per_rank["progress_tty"]["stderr"] == ""


# ---- format detection and config.json, in this process -------------------------------------------------------


def test_format_is_told_by_the_files(tmp_path, checkpoints):
    assert isinstance(open_reader(checkpoints["gqa"]["path"]), HuggingFaceReader)
    assert isinstance(open_reader(checkpoints["sharded_index"]["path"]), HuggingFaceReader)
    write_checkpoint(tmp_path / "meta", tiny_args())
    assert isinstance(open_reader(tmp_path / "meta"), ConsolidatedReader)
    (tmp_path / "neither").mkdir()
    (tmp_path / "neither" / "config.json").write_text("{}")
    (tmp_path / "neither" / "pytorch_model.bin").write_bytes(b"")
    with raises_naming(CheckpointError, tmp_path / "neither", "consolidated.NN.pth", "params.json", "config.json",
                       "model.safetensors", "model.safetensors.index.json"):
        open_checkpoint(tmp_path / "neither")
    with raises_naming(FileNotFoundError, "no_such_dir"):
        open_checkpoint(tmp_path / "no_such_dir")


def test_a_shard_missing_from_the_index_is_named(tmp_path, checkpoints):
    import shutil

    shutil.copytree(checkpoints["sharded_index"]["path"], tmp_path / "ckpt")
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / "ckpt" / victim).unlink()
    with raises_naming(CheckpointError, victim, "model.safetensors.index.json"):
        open_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize(
    "change, names",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ["rope type 'yarn'", "not supported"]),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, ["low_freq_factor", "high_freq_factor"]),
        ({"model_type": "mistral"}, ["'mistral'"]),
        ({"attention_bias": True}, ["attention_bias=True"]),
        ({"hidden_size": None}, ["'hidden_size'"]),
    ],
)
def test_config_json_that_is_not_a_llama_is_named(tmp_path, change, names):
    config = {**BASE, "model_type": "llama", **change}
    with raises_naming(ConfigError, tmp_path / "config.json", *names):
        args_from_hf_config(config, tmp_path / "config.json")


def test_rope_scaling_numbers_are_validated():
    with raises_naming(ConfigError, "rope_high_freq_factor=1.0", "rope_low_freq_factor=1.0"):
        tiny_args(use_scaled_rope=True, rope_high_freq_factor=1.0).validate()
    with raises_naming(ConfigError, "rope_scaling_factor", "0"):
        tiny_args(use_scaled_rope=True, rope_scaling_factor=0).validate()
    tiny_args(rope_scaling_factor=0).validate()  # unused without use_scaled_rope
    with raises_naming(ConfigError, "explicit_head_dim", "-8"):
        tiny_args(explicit_head_dim=-8).validate()


def test_meta_defaults_are_unchanged():
    args = ModelArgs(dim=4096, n_heads=32, multiple_of=1024, ffn_dim_multiplier=1.3, use_scaled_rope=True)
    assert (args.head_dim, args.ffn_hidden_dim, args.tie_word_embeddings) == (128, 14336, False)
    assert (args.rope_scaling_factor, args.rope_low_freq_factor, args.rope_high_freq_factor,
            args.rope_original_context) == (8.0, 1.0, 4.0, 8192)


def test_rotary_order_is_undone_per_head():
    weight = torch.randn(6 * 8, 5)
    hf = rotary_rows_to_hf(weight, head_dim=8)
    assert torch.equal(rotary_rows_from_hf(hf, head_dim=8), weight)
    assert torch.equal(hf[:4], weight[0:8:2]) and torch.equal(hf[4:8], weight[1:8:2])  # halves of head 0
    # A rank holding heads 2..3 undoes its own rows alone.
    assert torch.equal(rotary_rows_from_hf(hf[16:32], head_dim=8), weight[16:32])


# ---- convert: both ways, byte for byte ------------------------------------------------------------------------


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    )


def _meta_tensors(path) -> dict[str, torch.Tensor]:
    checkpoint = open_checkpoint(path)
    shapes = weight_shapes(checkpoint.args)
    return {name: checkpoint.reader.read(name, shape, None) for name, shape in shapes.items()}


def _hf_tensors(path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(safetensors_torch.load_file(file))
    return tensors


@pytest.mark.parametrize("shards, n_kv_heads", [(1, 4), (2, 2)])
def test_meta_to_hf_to_meta_is_exact(tmp_path, shards, n_kv_heads):
    args = tiny_args(n_kv_heads=n_kv_heads, use_scaled_rope=True, rope_theta=500000.0)
    weights = write_checkpoint(tmp_path / "meta", args, num_shards=shards, seed=4)
    assert cli_main(["convert", str(tmp_path / "meta"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "meta",
                     "--shards", str(shards)]) == 0
    assert len(list((tmp_path / "back").glob("consolidated.*.pth"))) == shards
    back = _meta_tensors(tmp_path / "back")
    assert back.keys() == weights.keys()
    for name, tensor in weights.items():
        assert _same_bytes(back[name], tensor), name
    params, back_params = (json.loads((tmp_path / d / "params.json").read_text()) for d in ("meta", "back"))
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "norm_eps", "rope_theta", "use_scaled_rope"):
        assert back_params[key] == params[key], key
    assert open_checkpoint(tmp_path / "back").args.ffn_hidden_dim == args.ffn_hidden_dim
    # transformers reads the converted directory as the same model: Meta's names and rotary order were mapped.
    from transformers import LlamaForCausalLM

    hf_model = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = hf_model(TOKENS).logits
    assert rel_diff(hf_logits, reference_logits(weights, args, TOKENS)) <= 1e-5


@pytest.mark.parametrize("name", ["gqa", "tied", "rope_llama3_32", "sharded_index", "bf16", "head_dim_32"])
def test_hf_to_meta_to_hf_is_exact(tmp_path, checkpoints, name):
    from pathlib import Path

    src = Path(checkpoints[name]["path"])
    convert(str(src), str(tmp_path / "meta"), to="meta", shards=2)
    convert(str(tmp_path / "meta"), str(tmp_path / "hf"), to="hf", max_shard_gb=1e-4 if name == "sharded_index" else 5)
    original, back = _hf_tensors(src), _hf_tensors(tmp_path / "hf")
    assert back.keys() == original.keys()  # a tied checkpoint comes back tied: no lm_head.weight
    for hf in original:
        assert _same_bytes(back[hf], original[hf]), hf
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file() == (name == "sharded_index")
    source_args = args_from_hf_config(json.loads((src / "config.json").read_text()), src)
    back_args = args_from_hf_config(json.loads((tmp_path / "hf" / "config.json").read_text()), src)
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "ffn_hidden_dim", "norm_eps",
                  "rope_theta", "use_scaled_rope", "rope_scaling_factor", "rope_original_context",
                  "tie_word_embeddings"):
        assert getattr(back_args, field) == getattr(source_args, field), field
    # The Meta directory in between says the same (Meta stores the tied output layer as its own weight).
    meta_args = open_checkpoint(tmp_path / "meta").args
    assert (meta_args.head_dim, meta_args.ffn_hidden_dim, meta_args.rope_scaling_factor) == (
        source_args.head_dim, source_args.ffn_hidden_dim, source_args.rope_scaling_factor)


def test_convert_refuses_what_it_cannot_do(tmp_path, checkpoints, capsys):
    src = checkpoints["gqa"]["path"]
    assert cli_main(["convert", src, str(tmp_path / "out"), "--to", "gguf"]) == 2
    assert "--to must be one of hf, meta, got 'gguf'" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert cli_main(["convert", src, str(tmp_path / "full"), "--to", "meta"]) == 2
    assert "is not an empty directory" in capsys.readouterr().err
    assert cli_main(["convert", src, str(tmp_path / "out"), "--to", "meta", "--shards", "4"]) == 2
    assert "n_kv_heads=2" in capsys.readouterr().err
    write_checkpoint(tmp_path / "float", tiny_args())
    assert cli_main(["quantize", str(tmp_path / "float"), str(tmp_path / "int8")]) == 0
    capsys.readouterr()
    assert cli_main(["convert", str(tmp_path / "int8"), str(tmp_path / "out"), "--to", "hf"]) == 2
    assert "holds quantized weights: convert the float checkpoint" in capsys.readouterr().err


def test_generate_from_the_bundled_model_converted_to_hf(tmp_path, capsys):
    """The command line runs a converted directory (its tokenizer.model carried over) as it runs the original."""
    from pathlib import Path

    tiny = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny"
    flags = ["--prompt", "one two three four", "--temperature", "0", "--max_gen_len", "8"]
    assert cli_main(["convert", str(tiny), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert cli_main(["generate", "--ckpt_dir", str(tmp_path / "hf"), *flags]) == 0
    from_hf = capsys.readouterr().out
    assert cli_main(["generate", "--ckpt_dir", str(tiny), *flags]) == 0
    from_meta = capsys.readouterr().out
    def continuation(out: str) -> str:
        lines = out.splitlines()
        return lines[lines.index("> one two three four") + 1]

    assert continuation(from_hf).startswith("five six seven eight")
    assert continuation(from_hf) == continuation(from_meta)


# ---- a whole Hugging Face directory, as a user runs it ----------------------------------------------------------


def test_chat_on_a_hugging_face_directory_with_no_other_flag(tmp_path, hf_tokenizer_dir):
    """`torchrun --nproc_per_node 2 -m llama_dist chat --ckpt_dir HF_DIR`: weights, tokenizer.json, chat template
    and stop tokens all come from the directory, and the answer is transformers' greedy answer to the same
    dialog (apply_chat_template, then generate), token for token."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    from helpers import SPM_VOCAB
    from transformers import AutoTokenizer, LlamaForCausalLM

    hf_dir = save_hf(tmp_path / "hf", dict(BASE, vocab_size=SPM_VOCAB, tie_word_embeddings=True))
    for name in os.listdir(hf_tokenizer_dir):
        shutil.copy(os.path.join(hf_tokenizer_dir, name), hf_dir / name)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    new_tokens = 6
    (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [tokenizer.convert_tokens_to_ids("<|eot_id|>")]}))
    dialog = [{"role": "user", "content": "hello there"}]
    ids = tokenizer.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True, return_dict=False)
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    expected = tokenizer.decode(out[0, len(ids):], skip_special_tokens=False)

    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    # Greedy and a bounded answer, so the comparison is exact and short; the rest is the directory's.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "llama_dist", "chat", "--ckpt_dir", str(hf_dir), "--temperature", "0", "--max_gen_len", str(new_tokens)]
    result = subprocess.run(command, input="hello there\nexit\n", capture_output=True, text=True, env=env, cwd=repo,
                            timeout=180, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = result.stdout.split("assistant> ", 1)[1].split("\n", 1)[0]
    print(f"ours: {answer!r}; transformers: {expected!r}")
    # Our chat stops at a stop token (not shown); transformers was told to run on through it.
    assert answer and answer == expected.split("<|eot_id|>")[0], (answer, expected)


def test_tied_checkpoint_quantizes_its_output_apart_from_the_embedding(tmp_path):
    """With tied embeddings the output layer is quantized on its own; the embedding stays the float weights."""
    from llama_dist.dist.groups import shutdown_distributed
    from llama_dist.model.quant import Int8Weight

    path = save_hf(tmp_path / "tied", dict(BASE, vocab_size=128, tie_word_embeddings=True))
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    init_distributed()
    try:
        float_model = load_model(path, max_seq_len=16, max_batch_size=2)
        int8_model = load_model(path, max_seq_len=16, max_batch_size=2, quantize="int8")
        assert isinstance(int8_model.output.weight, Int8Weight)
        assert torch.equal(int8_model.tok_embeddings.weight, float_model.tok_embeddings.weight)
        assert rel_diff(int8_model(tokens, 0).logits, float_model(tokens, 0).logits) < 5e-2
    finally:
        shutdown_distributed()


def test_quantized_hugging_face_checkpoints_are_refused(tmp_path, checkpoints):
    import shutil

    path = tmp_path / "gptq"
    shutil.copytree(checkpoints["gqa"]["path"], path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (path / "config.json").write_text(json.dumps(config))
    with raises_naming(CheckpointError, "config.json", "'gptq'", "--quantize"):
        load_model(path, max_seq_len=16, max_batch_size=2)
