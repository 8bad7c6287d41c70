"""config.py: validation of shapes against a world size, dtypes, and the named presets (`transformer_configs`:
published parameter counts, Meta's model list, the bundled model)."""

import dataclasses
from pathlib import Path

import pytest
import torch
from helpers import raises_naming, tiny_args

from llama_dist.config import RUNTIME_LIMITS, ModelArgs, resolve_dtype, transformer_configs
from llama_dist.errors import ConfigError
from llama_dist.model.weights import weight_shapes

# Published sizes (model cards / Hugging Face's counts), in billions, with the figure's own precision. Meta's
# checkpoints store `output.weight` for every model; Hugging Face ties it to the embedding for Llama 3.2 1B
# and 3B, whose published counts are therefore the tied ones.
PUBLISHED_B = {
    "Llama-2-7B": 6.74,
    "Llama-2-13B": 13.0,
    "Llama-2-70B": 68.98,
    "Llama-3-8B": 8.03,
    "Llama-3-70B": 70.55,
    "Llama-3.1-8B": 8.03,
    "Llama-3.1-70B": 70.55,
    "Llama-3.1-405B": 405.85,
    "Llama-3.2-1B": 1.50,
    "Llama-3.2-3B": 3.61,
}
PUBLISHED_TIED_B = {"Llama-3.2-1B": 1.24, "Llama-3.2-3B": 3.21}
# Every figure above is rounded to 3 or 4 significant digits: the worst rounding error is 13.0B (+-0.4%).
TOLERANCE = 0.005

# llama_models' sku_list names for the presets (its Llama 2 arch_args are Llama 3's shapes: not compared).
SKU_NAMES = {
    "Llama-3-8B": "Llama-3-8B",
    "Llama-3-70B": "Llama-3-70B",
    "Llama-3.1-8B": "Llama3.1-8B",
    "Llama-3.1-70B": "Llama3.1-70B",
    "Llama-3.1-405B": "Llama3.1-405B:bf16-mp8",
    "Llama-3.2-1B": "Llama3.2-1B",
    "Llama-3.2-3B": "Llama3.2-3B",
}
TINY_PARAMS = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny" / "params.json"


def test_every_issue_preset_exists():
    assert set(PUBLISHED_B) | {"tiny"} == set(transformer_configs)


@pytest.mark.parametrize("name", list(PUBLISHED_B))
def test_parameter_count_matches_published_size(name):
    args = ModelArgs(**transformer_configs[name])
    counted = sum(_numel(shape) for shape in weight_shapes(args).values())
    assert args.num_parameters() == counted  # the arithmetic agrees with the checkpoint's tensor shapes
    print(f"\n{name}: {counted:,} parameters (published {PUBLISHED_B[name]}B)")
    assert abs(counted / 1e9 - PUBLISHED_B[name]) <= TOLERANCE * PUBLISHED_B[name]
    if name in PUBLISHED_TIED_B:
        tied = args.num_parameters(tied_embeddings=True)
        assert tied == counted - args.vocab_size * args.dim
        assert abs(tied / 1e9 - PUBLISHED_TIED_B[name]) <= TOLERANCE * PUBLISHED_TIED_B[name]


def test_known_ffn_widths():
    # Hugging Face's intermediate_size for each model, which Meta's rounding rule must reproduce.
    widths = {"Llama-2-7B": 11008, "Llama-2-13B": 13824, "Llama-2-70B": 28672, "Llama-3-8B": 14336,
              "Llama-3.1-405B": 53248, "Llama-3.2-1B": 8192, "Llama-3.2-3B": 8192}
    for name, width in widths.items():
        assert ModelArgs(**transformer_configs[name]).ffn_hidden_dim == width, name


@pytest.mark.parametrize("name", list(SKU_NAMES))
def test_llama3_presets_match_meta_model_list(name):
    sku_list = pytest.importorskip("llama_models.sku_list", reason="llama-models is not installed")
    model = sku_list.resolve_model(SKU_NAMES[name])
    assert model is not None, SKU_NAMES[name]
    preset = transformer_configs[name]
    assert {k: model.arch_args[k] for k in preset} == preset


def test_presets_take_output_defaults_and_run_on_their_world_sizes():
    args = ModelArgs(**transformer_configs["Llama-3.1-405B"], output_hidden_states=True, output_attentions=True)
    assert (args.output_hidden_states, args.output_attentions) == (True, True)
    args.validate(8)
    args.validate(16)  # 16 ranks, 8 KV heads: each KV head on two ranks
    assert ModelArgs(**transformer_configs["tiny"]).output_attentions is False
    for name in ("Llama-2-7B", "Llama-3-8B", "Llama-3.2-1B", "Llama-3.2-3B"):
        ModelArgs(**transformer_configs[name]).validate(1)
        ModelArgs(**transformer_configs[name]).validate(2)


def test_model_args_describe_the_model_only():
    # The runtime limits belong to the run (load_model, Llama.build, Transformer.setup_caches), not to ModelArgs.
    assert not {field.name for field in dataclasses.fields(ModelArgs)} & set(RUNTIME_LIMITS)
    assert not any(hasattr(ModelArgs(), name) for name in RUNTIME_LIMITS)
    # Meta's reference ModelArgs takes them: here that is one error saying where they go.
    with raises_naming(ConfigError, "max_seq_len", "load_model", "Llama.build", "setup_caches"):
        ModelArgs(**transformer_configs["tiny"], max_seq_len=64)
    with raises_naming(ConfigError, "max_batch_size and max_seq_len"):
        ModelArgs(max_batch_size=1, max_seq_len=64)


def test_tiny_preset_matches_bundled_checkpoint():
    if not TINY_PARAMS.is_file():
        pytest.skip(f"{TINY_PARAMS} is not there (checkpoints/make_tiny.py makes it)")
    stored = ModelArgs.from_params_json(TINY_PARAMS)
    assert ModelArgs(**transformer_configs["tiny"]) == stored


def _numel(shape):
    n = 1
    for size in shape:
        n *= size
    return n


# ---- shapes that cannot run on a world size ------------------------------------------------------------


@pytest.mark.parametrize(
    "args, world_size, names",
    [
        (tiny_args(), 3, ["n_heads=4", "world size 3"]),
        (tiny_args(dim=96, n_heads=12, n_kv_heads=3), 2, ["n_kv_heads=3", "world size 2"]),  # 2 < 3, 3 % 2
        (tiny_args(dim=96, n_heads=12, n_kv_heads=3), 4, ["n_kv_heads=3", "world size 4"]),  # 4 > 3, 4 % 3
        (tiny_args(vocab_size=130), 4, ["vocab_size=130", "world size 4"]),
        (tiny_args(vocab_size=-1), 1, ["vocab_size", "-1"]),
        (tiny_args(n_kv_heads=3), 1, ["n_heads=4", "n_kv_heads=3"]),
        (tiny_args(dim=62), 1, ["dim=62", "n_heads=4"]),
        (tiny_args(n_layers=0), 1, ["n_layers", "0"]),
    ],
    ids=["heads-vs-world", "kv3-world2", "kv3-world4", "vocab", "vocab-unset", "heads-vs-kv", "dim-vs-heads",
         "no-layers"],
)
def test_validate_rejects_shapes_the_world_size_cannot_split(args, world_size, names):
    with raises_naming(ConfigError, *names):
        args.validate(world_size)


@pytest.mark.parametrize(
    "args, world_sizes",
    [
        (tiny_args(n_kv_heads=2), (1, 2, 4)),  # at 4 ranks each KV head is replicated on 2 ranks
        (tiny_args(dim=96, n_heads=12, n_kv_heads=3, vocab_size=96, multiple_of=96), (1, 3, 6, 12)),
    ],
)
def test_validate_accepts_divisible_shapes(args, world_sizes):
    for n in world_sizes:
        args.validate(n)


def test_resolve_dtype():
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == resolve_dtype(torch.float16, torch.device("cpu"))
    with raises_naming(ConfigError, "dtype must be one of float32, bfloat16, float16", "'int8'"):
        resolve_dtype("int8", torch.device("cpu"))
