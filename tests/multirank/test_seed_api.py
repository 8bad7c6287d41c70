"""The seed's model API (the gpt-fast fork the project grew from), run as a user would: a preset config with
hidden-state and attention flags, `Transformer.from_pretrained` on the bundled checkpoint, `encode(text)`,
`model(ids, torch.arange(n))`, argmax, decode; as one plain process and under torchrun at 2 ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama_dist import (
    Llama,
    ModelArgs,
    SentencePieceWrapper,
    TiktokenWrapper,
    TokenizerInterface,
    Transformer,
    TransformerOutput,
    format_dialog,
    init_distributed,
    load_model,
    load_tokenizer,
    run_with_cache,
    to_str_tokens,
    transformer_configs,
)

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "checkpoints" / "tiny"
EXAMPLE = Path(__file__).with_name("seed_example.py")


def run_example(launcher: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    proc = subprocess.run(launcher + [str(EXAMPLE), str(TINY)], capture_output=True, text=True, timeout=240,
                          env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("ranks", [1, 2])
def test_seed_example_runs(ranks):
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    seen = run_example(launcher)
    assert seen["world_size"] == ranks
    assert seen["logits_equal"]  # model(ids, input_pos) and model(ids, start_pos) give identical logits
    assert seen["hidden_states"] == seen["n_layers"] + 1 and seen["attentions"] == seen["n_layers"]
    assert seen["text"] == "five six seven eight nine ten"  # the bundled toy counts
    assert seen["bos_is_meta_style"]


def test_public_api_names():
    assert callable(Transformer.from_pretrained) and callable(init_distributed) and callable(load_model)
    assert issubclass(SentencePieceWrapper, TokenizerInterface) and issubclass(TiktokenWrapper, TokenizerInterface)
    assert {"tiny", "Llama-3.1-8B"} <= set(transformer_configs) and ModelArgs(**transformer_configs["tiny"]).dim
    assert TransformerOutput.__dataclass_fields__["logits"]
    for fn in (Llama.build, load_tokenizer, format_dialog, run_with_cache, to_str_tokens):
        assert callable(fn)


def test_tokenizer_calls_of_both_apis():
    tok = load_tokenizer(TINY / "tokenizer.model")
    plain = tok.encode("one two")
    assert tok.encode("one two", bos=True, eos=False) == [tok.bos_id()] + plain  # Meta's positional spelling too
    assert tok.encode("one two", True, True) == [tok.bos_id] + plain + [tok.eos_id]
    assert tok.bos_id() == tok.bos_id and isinstance(tok.eos_id(), int)
    assert tok.decode(plain) == "one two"


def test_input_pos_must_be_consecutive_positions():
    from llama_dist.model.llama import _first_position

    assert _first_position(torch.arange(3, 7), 4) == 3 and _first_position(5, 4) == 5
    for bad in (torch.tensor([0, 2, 3]), torch.arange(4).float(), torch.arange(4)[None]):
        with pytest.raises(ValueError, match="input_pos"):
            _first_position(bad, 3)


def test_unknown_preset_is_named():
    from llama_dist.checkpoint.loader import from_pretrained
    from llama_dist.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown model preset 'tinyy'"):
        from_pretrained("tinyy", TINY)
