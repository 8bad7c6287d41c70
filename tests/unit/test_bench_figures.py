"""What the benchmarks compute around the model: the KV bytes a decode step reads, timings at gen_len 1 (no decode
step), and how transformers' static cache + compile reference is set up (compiled once)."""

import math
from types import SimpleNamespace

import pytest
import torch

from llama_dist.bench.gpu import generation_rates
from llama_dist.bench.hf import _hf_rates, compile_static
from llama_dist.bench.traffic import kv_bytes_per_decode_step, kv_bytes_per_token


def test_kv_bytes_are_the_mean_context_of_the_decode_steps():
    # 10-token prompts, 5 tokens: decode steps 1..4 attend over 11, 12, 13, 14 positions of each row.
    assert kv_bytes_per_decode_step(1000, 2, 10, 5) == 2 * 1000 * (11 + 12 + 13 + 14) / 4
    for prompt_len, gen_len in [(1, 2), (64, 32), (7, 100)]:
        steps = [prompt_len + j for j in range(1, gen_len)]
        assert kv_bytes_per_decode_step(3, 1, prompt_len, gen_len) == pytest.approx(3 * sum(steps) / len(steps))
    assert kv_bytes_per_decode_step(1000, 8, 10, 1) == 0  # a generation of one token has no decode step


def test_kv_bytes_per_token_count_keys_and_values_of_every_layer_in_the_cache_dtype():
    attention = SimpleNamespace(n_local_kv_heads=2, head_dim=64)
    model = SimpleNamespace(args=SimpleNamespace(n_layers=16), layers=[SimpleNamespace(attention=attention)],
                            cache=SimpleNamespace(k=[torch.empty(0, dtype=torch.bfloat16)]))
    assert kv_bytes_per_token(model) == 2 * 16 * 2 * 64 * 2


def test_timings_at_gen_len_1_have_no_decode_rate():
    calls = []
    first, step = generation_rates(lambda prompts, n: calls.append(n), [[1, 2]], 1, warmup=1, repeats=2,
                                   device=torch.device("cpu"))
    assert first >= 0 and math.isnan(step) and set(calls) == {1}
    model = SimpleNamespace(generate=lambda prompt, max_new_tokens, **kwargs: calls.append(max_new_tokens))
    first, rate = _hf_rates(model, torch.ones(1, 3, dtype=torch.long), 1, repeats=2)
    assert first >= 0 and math.isnan(rate)


def test_transformers_static_cache_is_compiled_once_at_its_largest_size():
    calls = []
    model = SimpleNamespace(generate=lambda prompt, max_new_tokens, **kwargs: calls.append(max_new_tokens))
    _hf_rates(model, torch.ones(1, 3, dtype=torch.long), 16, repeats=1, compiled=True)
    assert calls[0] == 16  # the first call sizes the static cache: every later one fits in it
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "CompileConfig"):
        pytest.skip("transformers without CompileConfig: its forward is compiled by hand")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    hf = transformers.LlamaForCausalLM(config)
    forward = hf.forward
    compile_static(hf)
    # generate compiles the decoding forward itself, from compile_config: wrapping forward as well compiled twice.
    assert hf.forward == forward and not hasattr(hf.forward, "_torchdynamo_orig_callable")
    assert hf.generation_config.cache_implementation == "static"
    assert hf.generation_config.compile_config.mode == "reduce-overhead"
