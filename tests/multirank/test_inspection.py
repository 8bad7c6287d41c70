"""Inspection API: hidden states and attentions against transformers' LlamaForCausalLM at 1 and 2 ranks,
run_with_cache, load_model with a given config, to_tokens / to_str_tokens.

Our model runs in real gloo ranks (one launch per world size, every configuration in it); transformers' model
runs in the test process on the same random float32 weights, converted to its names and RoPE layout.
"""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from helpers import rel_diff, tiny_args, write_checkpoint

from llama_dist.checkpoint.loader import load_model
from llama_dist.dist.groups import init_distributed
from llama_dist.dist.local_launch import run_local
from llama_dist.model.inspection import run_with_cache, to_str_tokens, to_tokens
from llama_dist.text.tokenizer import SentencePieceWrapper

TOLERANCE = 1e-5  # float32, relative to the largest magnitude of the reference tensor (as test_model.py)
SELF_TOLERANCE = 1e-5  # our model against itself (cache vs output, decode vs full forward)
WORLD_SIZES = (1, 2)
DECODE_FROM = 6

CONFIGS = {
    # name: (model args, shards, family, seed, path form); "llama2" has params.json vocab_size -1 and 2 shards
    "gqa": (tiny_args(n_kv_heads=2), 1, "llama3", 21, "dir"),
    "llama31": (tiny_args(n_kv_heads=2, rope_theta=500000.0, use_scaled_rope=True, ffn_dim_multiplier=1.3), 1,
                "llama3", 22, "file"),
    "llama2": (tiny_args(), 2, "llama2", 23, "dir"),
}
CHECKED = "gqa"  # the configuration the extra (non-HF) checks run on


# ---- transformers' model on the same weights -------------------------------------------------------------


def hf_model(weights, args):
    transformers = pytest.importorskip("transformers", reason="transformers (the reference model) is not installed")
    if args.use_scaled_rope:
        rope = {"rope_type": "llama3", "rope_theta": args.rope_theta, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    else:
        rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    config = transformers.LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        rms_norm_eps=args.norm_eps, rope_parameters=rope, max_position_embeddings=131072,
        tie_word_embeddings=False, attn_implementation="eager",  # eager: the only one that returns attentions
    )
    model = transformers.LlamaForCausalLM(config).float().eval()
    model.load_state_dict(hf_state_dict(weights, args), strict=True)
    return model


def hf_state_dict(weights, args):
    """Meta names -> transformers names. Meta's RoPE rotates interleaved pairs (x0, x1), (x2, x3), ...;
    transformers' rotates halves (x_i, x_{i + hd/2}): permute the rows of wq and wk within each head to match."""
    hd, d = args.head_dim, args.dim

    def permute(w, heads):
        return w.view(heads, hd // 2, 2, d).transpose(1, 2).reshape(heads * hd, d)

    out = {"model.embed_tokens.weight": weights["tok_embeddings.weight"], "model.norm.weight": weights["norm.weight"],
           "lm_head.weight": weights["output.weight"]}
    for i in range(args.n_layers):
        m, h = f"layers.{i}.", f"model.layers.{i}."
        out.update({
            h + "self_attn.q_proj.weight": permute(weights[m + "attention.wq.weight"], args.n_heads),
            h + "self_attn.k_proj.weight": permute(weights[m + "attention.wk.weight"], args.n_kv_heads),
            h + "self_attn.v_proj.weight": weights[m + "attention.wv.weight"],
            h + "self_attn.o_proj.weight": weights[m + "attention.wo.weight"],
            h + "mlp.gate_proj.weight": weights[m + "feed_forward.w1.weight"],
            h + "mlp.up_proj.weight": weights[m + "feed_forward.w3.weight"],
            h + "mlp.down_proj.weight": weights[m + "feed_forward.w2.weight"],
            h + "input_layernorm.weight": weights[m + "attention_norm.weight"],
            h + "post_attention_layernorm.weight": weights[m + "ffn_norm.weight"],
        })
    return out


# ---- rank worker ---------------------------------------------------------------------------------------


def inspect_worker(jobs: list[dict]) -> list[dict]:
    """On each rank: load each job's checkpoint with its given config and return what the tests compare."""
    init_distributed()
    results = []
    for job in jobs:
        model = load_model(job["path"], job["config"])
        tokens = job["tokens"]
        out = model(tokens, 0, output_hidden_states=True, output_attentions=True)
        res = {"logits": out.logits, "hidden": out.hidden_states, "attentions": out.attentions}
        if job["checks"]:
            res.update(_extra_checks(model, job, tokens))
        results.append(res)
    return results


def _extra_checks(model, job, tokens):
    res = {}
    plain = model(tokens, 0)
    res["plain"] = (plain.logits, plain.hidden_states, plain.attentions)
    only = model(tokens, 0, output_hidden_states=True, output_attentions=True, last_only=True, gather="rank0")
    res["last_only"] = (only.logits, only.hidden_states, only.attentions)

    # Prefill, then one token per call: each step's attention row over the cache.
    model(tokens[:, :DECODE_FROM], 0)
    res["decode_attentions"] = [
        model(tokens[:, pos : pos + 1], pos, output_attentions=True).attentions for pos in range(DECODE_FROM, tokens.shape[1])
    ]

    # Flags from the config, overridden per call.
    flagged = load_model(job["path"], dataclasses.replace(job["config"], output_attentions=True))
    res["config_flag"] = flagged(tokens, 0).attentions is not None
    res["call_override"] = flagged(tokens, 0, output_attentions=False).attentions is None

    logits, cache = run_with_cache(model, tokens, attentions=True)
    res["cache_logits"], res["cache"] = logits, cache
    res["renormed"] = model.norm(cache[f"blocks.{len(model.layers) - 1}.resid_post"])
    res["hooks_left"] = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return res


# ---- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokens = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(5))
    jobs, refs = [], {}
    for name, (args, shards, family, seed, form) in CONFIGS.items():
        ckpt = tmp_path_factory.mktemp(name)
        weights = write_checkpoint(ckpt, args, shards, family, seed=seed)
        config = dataclasses.replace(args, vocab_size=-1) if family == "llama2" else args
        path = ckpt / "consolidated.00.pth" if form == "file" else ckpt
        jobs.append({"config": config, "path": str(path), "tokens": tokens, "checks": name == CHECKED})
        refs[name] = (weights, args)
    return tokens, jobs, refs


@pytest.fixture(scope="module")
def reference(setup):
    """transformers' outputs per configuration (skips the HF tests when transformers is missing)."""
    tokens, _, refs = setup
    outputs = {}
    for name, (weights, args) in refs.items():
        with torch.no_grad():
            out = hf_model(weights, args)(tokens, output_hidden_states=True, output_attentions=True)
        outputs[name] = {"logits": out.logits, "hidden": out.hidden_states, "attentions": out.attentions}
    return outputs


@pytest.fixture(scope="module")
def results(setup):
    """{world_size: [rank][job] -> outputs}: one launch per world size."""
    _, jobs, _ = setup
    return {n: run_local(inspect_worker, n, jobs, timeout_s=240) for n in WORLD_SIZES}


def _job(results, world_size, name):
    return [per_rank[list(CONFIGS).index(name)] for per_rank in results[world_size]]


# ---- against transformers ------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_hidden_states_and_attentions_match_transformers(results, reference, name, world_size):
    ours, ref = _job(results, world_size, name)[0], reference[name]
    args = CONFIGS[name][0]
    assert len(ours["hidden"]) == len(ref["hidden"]) == args.n_layers + 1
    assert len(ours["attentions"]) == len(ref["attentions"]) == args.n_layers
    diffs = {"logits": rel_diff(ours["logits"], ref["logits"])}
    for i, (a, b) in enumerate(zip(ours["hidden"], ref["hidden"])):
        assert a.shape == b.shape == (2, 11, args.dim)
        diffs[f"hidden {i}"] = rel_diff(a, b)
    for i, (a, b) in enumerate(zip(ours["attentions"], ref["attentions"])):
        assert a.shape == b.shape == (2, args.n_heads, 11, 11)
        diffs[f"attention {i}"] = rel_diff(a, b)
    worst = max(diffs, key=diffs.get)
    print(f"\n{name} world={world_size}: max relative diff to transformers {diffs[worst]:.2e} ({worst}); "
          f"hidden {max(v for k, v in diffs.items() if k.startswith('hidden')):.2e}, "
          f"attentions {max(v for k, v in diffs.items() if k.startswith('attention')):.2e}")
    assert diffs[worst] < TOLERANCE, diffs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_rank_receives_identical_outputs(results, name):
    ranks = _job(results, 2, name)
    for key in ("hidden", "attentions"):
        for a, b in zip(ranks[0][key], ranks[1][key]):
            assert torch.equal(a, b), key
    assert torch.equal(ranks[0]["logits"], ranks[1]["logits"])


# ---- our own conventions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_flags_off_by_default_and_last_only_gather_rank0(results, world_size):
    ranks = _job(results, world_size, CHECKED)
    full = ranks[0]
    for rank, res in enumerate(ranks):
        logits, hidden, attentions = res["plain"]
        assert hidden is None and attentions is None
        assert rel_diff(logits, full["logits"]) < SELF_TOLERANCE  # the fused-attention path, same numbers
        logits, hidden, attentions = res["last_only"]
        if rank == 0:
            assert rel_diff(logits, full["logits"][:, -1:]) < SELF_TOLERANCE
        else:
            assert logits is None
        # Hidden states and attentions cover every position whatever last_only / gather say.
        assert all(torch.equal(a, b) for a, b in zip(hidden, full["hidden"]))
        assert all(torch.equal(a, b) for a, b in zip(attentions, full["attentions"]))
        assert res["config_flag"] and res["call_override"]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_decode_attentions_are_rows_of_the_full_pattern(results, world_size):
    res = _job(results, world_size, CHECKED)[0]
    for step, per_layer in enumerate(res["decode_attentions"]):
        pos = DECODE_FROM + step
        for layer, attention in enumerate(per_layer):
            assert attention.shape == (2, 4, 1, pos + 1)
            assert rel_diff(attention, res["attentions"][layer][:, :, pos : pos + 1, : pos + 1]) < SELF_TOLERANCE


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_run_with_cache(results, world_size):
    ranks = _job(results, world_size, CHECKED)
    res = ranks[0]
    args = CONFIGS[CHECKED][0]
    cache, hidden, n = res["cache"], res["hidden"], args.n_layers
    per_layer = ("resid_pre", "attn_in", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post", "attn.pattern")
    assert set(cache) == {"embed", "final_norm"} | {f"blocks.{i}.{k}" for i in range(n) for k in per_layer}
    for name, value in cache.items():
        expected = (2, args.n_heads, 11, 11) if name.endswith("pattern") else (2, 11, args.dim)
        assert value.shape == expected, name
    assert torch.equal(res["cache_logits"], res["logits"])
    assert torch.equal(cache["embed"], hidden[0]) and torch.equal(cache["blocks.0.resid_pre"], hidden[0])
    for i in range(n):
        b = f"blocks.{i}."
        assert rel_diff(cache[b + "resid_mid"], cache[b + "resid_pre"] + cache[b + "attn_out"]) < SELF_TOLERANCE
        assert rel_diff(cache[b + "resid_post"], cache[b + "resid_mid"] + cache[b + "mlp_out"]) < SELF_TOLERANCE
        assert torch.equal(cache[b + "attn.pattern"], res["attentions"][i])
        if i + 1 < n:
            assert torch.equal(cache[b + "resid_post"], hidden[i + 1])
            assert torch.equal(cache[b + "resid_post"], cache[f"blocks.{i + 1}.resid_pre"])
    # The last block's output, through the final norm, is the last hidden state (transformers' convention).
    assert torch.equal(res["renormed"], hidden[-1]) and torch.equal(cache["final_norm"], hidden[-1])
    assert res["hooks_left"] == 0
    for other in ranks[1:]:  # full width and identical everywhere
        assert all(torch.equal(other["cache"][k], v) for k, v in cache.items())


# ---- tokens as strings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["hello world", "the llama answer: 12345", "café naïve", "日本 ok", " two  spaces"])
def test_to_tokens_and_to_str_tokens_round_trip(spm_model_path, text):
    tokenizer = SentencePieceWrapper(spm_model_path)
    llm = SimpleNamespace(tokenizer=tokenizer)  # anything with a .tokenizer, such as Llama
    tokens = to_tokens(llm, text)
    assert tokens.dtype == torch.long and tokens.shape == (1, len(tokenizer.encode(text, bos=True, eos=False)))
    assert tokens[0, 0].item() == tokenizer.bos_id
    strings = to_str_tokens(tokenizer, tokens)
    assert len(strings) == tokens.shape[1] and strings[0] == "<s>"
    assert "".join(strings[1:]) == tokenizer.decode(tokens[0, 1:].tolist()) == text
    assert to_str_tokens(llm, tokens[0].tolist()) == strings
    no_bos = to_tokens(tokenizer, text, bos=False)
    assert torch.equal(no_bos, tokens[:, 1:])
    # A string per ordinary token is that token's own text (byte tokens of one character aside).
    for token, string in zip(tokens[0, 1:].tolist(), strings[1:]):
        if string and "\ufffd" not in tokenizer.decode([token]):
            assert string.strip() == tokenizer.decode([token]).strip()
