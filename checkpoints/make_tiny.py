#!/usr/bin/env python
"""Make the bundled toy checkpoint: a ~1M-parameter Llama trained for a few minutes on synthetic text.

    python checkpoints/make_tiny.py [--out checkpoints/tiny] [--minutes 6]

Writes `<out>/params.json`, `<out>/consolidated.00.pth` (bfloat16, Meta layout) and `<out>/tokenizer.model`
(SentencePiece BPE with Llama 2's special ids), then loads them back through `Llama.build` and checks that
greedy decoding continues counting and the alphabet. Exits non-zero when it does not.

Everything is seeded and single-process; the same torch version on the same thread count reproduces the
same weights. `--minutes` is only a safety cap: training runs a fixed number of steps and stops early (with a
warning, and no longer reproducibly) only if the cap is reached first.

The model is a toy for checking the runtime (loading, sharding, generation) end to end. It is not a
language model: it knows counting, the alphabet, days, months and a handful of sentence templates.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO))

import torch
import torch.nn.functional as F

SEED = 1234
VOCAB_SIZE = 512  # divisible by 1, 2 and 4 so the model runs on those world sizes
MODEL_SHAPE = {
    "dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32, "norm_eps": 1e-5, "rope_theta": 10000.0,
}
MAX_SEQ_LEN = 128

# ---- synthetic text ----------------------------------------------------------------------------------

_ONES = "one two three four five six seven eight nine".split()
_TEENS = "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """1..100 in words: "seven", "forty two", "one hundred"."""
    if n == 100:
        return "one hundred"
    if n < 10:
        return _ONES[n - 1]
    if n < 20:
        return _TEENS[n - 10]
    tens, ones = divmod(n, 10)
    return _TENS[tens - 2] + ("" if ones == 0 else " " + _ONES[ones - 1])


NUMBERS = [number_words(n) for n in range(1, 101)]
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
MONTHS = "january february march april may june july august september october november december".split()

# Each animal always sits on the same thing, so "the cat sat on" has one right answer.
SITS_ON = {"cat": "mat", "dog": "log", "frog": "rock", "bird": "tree", "fox": "box", "bee": "flower"}
NAMES = "anna ben carl dora emma finn gus hana ivan jude kira leo".split()
LIKES = "apples bread cheese milk tea rice soup cake fish plums".split()
FACTS = [
    "the sky is blue .", "the grass is green .", "the sun is hot .", "snow is cold and white .",
    "fish swim in the sea .", "birds fly in the sky .", "a week has seven days .", "a year has twelve months .",
]


def synthetic_documents(n_docs: int, rng: random.Random) -> list[str]:
    """Short, highly predictable documents; each becomes `<s> text </s>` in training."""
    docs = []
    for _ in range(n_docs):
        kind = rng.random()
        if kind < 0.30:  # counting, ascending, often from one
            start = 1 if rng.random() < 0.3 else rng.randint(1, 96)
            end = rng.randint(start + 3, 100)
            docs.append(" ".join(NUMBERS[start - 1 : end]))
        elif kind < 0.50:  # the alphabet, often from a
            start = 0 if rng.random() < 0.3 else rng.randint(0, 22)
            end = rng.randint(start + 3, 25)
            docs.append(" ".join(LETTERS[start : end + 1]))
        elif kind < 0.60:  # days of the week, cyclic
            start, length = rng.randrange(7), rng.randint(3, 21)
            docs.append(" ".join(DAYS[(start + i) % 7] for i in range(length)))
        elif kind < 0.70:  # months, cyclic
            start, length = rng.randrange(12), rng.randint(3, 24)
            docs.append(" ".join(MONTHS[(start + i) % 12] for i in range(length)))
        elif kind < 0.80:
            animal = rng.choice(sorted(SITS_ON))
            docs.append(f"the {animal} sat on the {SITS_ON[animal]} .")
        elif kind < 0.88:
            docs.append(f"my name is {rng.choice(NAMES)} and i like {rng.choice(LIKES)} .")
        elif kind < 0.94:
            day = rng.randrange(7)
            docs.append(f"today is {DAYS[day]} and tomorrow is {DAYS[(day + 1) % 7]} .")
        else:
            docs.append(rng.choice(FACTS))
    return docs


# ---- tokenizer -----------------------------------------------------------------------------------------

def train_tokenizer(docs: list[str], out_path: Path) -> None:
    """SentencePiece BPE with Llama 2's layout: unk 0, bos 1, eos 2, no pad, byte fallback, no normalisation."""
    from llama_dist.text.tokenizer import train_llama2_style_tokenizer

    train_llama2_style_tokenizer(docs, VOCAB_SIZE, out_path)


def token_stream(tokenizer, docs: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The documents' ids end to end (each <s> ... </s>), and where each document starts in them."""
    ids, doc_starts = [], []
    for doc in docs:
        doc_starts.append(len(ids))
        ids.extend(tokenizer.encode(doc, bos=True, eos=True))
    return torch.tensor(ids), torch.tensor(doc_starts)


# ---- model -------------------------------------------------------------------------------------------

def init_parameters(model: torch.nn.Module, n_layers: int, gen: torch.Generator) -> None:
    """N(0, 0.02) matrices (residual outputs scaled down by depth), unit norm gains."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.fill_(1.0)
            else:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def train(args, tokens: torch.Tensor, doc_starts: torch.Tensor, model_args, deadline: float, bf16: bool = False):
    """bf16: run each step's matmuls in bfloat16 (autocast; float32 weights and optimizer). The autocast region is
    entered per step: autocast caches its casts of the weights until the region ends."""
    from llama_dist.model.llama import Transformer

    gen = torch.Generator().manual_seed(SEED)
    model = Transformer(model_args)
    init_parameters(model, model_args.n_layers, gen)
    # Training's limits: its batch and window (RoPE tables up to --seq-len; no KV cache).
    model.post_init(max_batch_size=args.batch_size, max_seq_len=args.seq_len, kv_cache=False)
    model.train().requires_grad_(True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, {model_args.n_layers} layers, dim {model_args.dim}", flush=True)

    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() == 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    # Windows start at a document's <s> so position 0 always holds bos, as in generation.
    seq = args.seq_len
    starts = doc_starts[doc_starts + seq + 1 <= len(tokens)]
    offsets = torch.arange(seq + 1)
    t0, loss_avg, done = time.perf_counter(), None, 0
    for step in range(args.steps):
        if time.perf_counter() > deadline:
            print(f"WARNING: time cap reached after {step} of {args.steps} steps; stopping early", flush=True)
            break
        pick = starts[torch.randint(len(starts), (args.batch_size,), generator=gen)]
        batch = tokens[pick[:, None] + offsets]
        inputs, targets = batch[:, :-1], batch[:, 1:]
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(inputs, 0).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        done = step + 1
        loss_avg = loss.item() if loss_avg is None else 0.9 * loss_avg + 0.1 * loss.item()
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  (avg {loss_avg:.4f})  lr {lr_at(step):.2e}  "
                  f"{time.perf_counter() - t0:6.1f}s", flush=True)
    elapsed = time.perf_counter() - t0
    print(f"trained {done} steps in {elapsed:.1f}s, final loss {loss.item():.4f} (avg {loss_avg:.4f})", flush=True)
    return model


# ---- checks ----------------------------------------------------------------------------------------------

# prompt -> the text a correct greedy continuation is a prefix of, and whether a mismatch fails the run.
CHECKS = {
    "one two three four": (" ".join(NUMBERS[4:]), True),
    "a b c d": (" ".join(LETTERS[4:]), True),
    "monday tuesday": (" ".join(DAYS[(2 + i) % 7] for i in range(30)), False),
    "the cat sat on": ("the mat .", False),
}


def continuation_ok(generation: str, expected: str, min_words: int) -> bool:
    """The generation is a prefix of the expected text (its last word may be cut) and long enough."""
    text = generation.strip()
    return expected.startswith(text) and len(text.split()) >= min(min_words, len(expected.split()))


def check_checkpoint(out: Path) -> bool:
    from llama_dist.llm import Llama

    llm = Llama.build(str(out), str(out / "tokenizer.model"), max_seq_len=MAX_SEQ_LEN, max_batch_size=4,
                      dtype="float32")
    prompts = list(CHECKS)
    results = llm.text_completion(prompts, temperature=0, max_gen_len=16, logprobs=True)
    ok = True
    for prompt, result in zip(prompts, results):
        expected, required = CHECKS[prompt]
        good = continuation_ok(result["generation"], expected, min_words=3 if prompt.startswith("the") else 8)
        mark = "ok" if good else ("FAIL" if required else "unexpected (not required)")
        least = math.exp(min(result["logprobs"])) if result["logprobs"] else float("nan")
        print(f"{prompt!r} -> {result['generation']!r}  [{mark}; least confident token p={least:.3f}]", flush=True)
        ok &= good or not required
    return ok


# ---- main ------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "tiny"))
    parser.add_argument("--minutes", type=float, default=6.0, help="safety cap on the whole run")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=MAX_SEQ_LEN)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--docs", type=int, default=8000)
    parser.add_argument("--log-every", type=int, default=25)
    args = parser.parse_args(argv)
    if args.seq_len > MAX_SEQ_LEN:
        parser.error(f"--seq-len must be at most {MAX_SEQ_LEN}")

    start = time.perf_counter()
    deadline = start + 60 * args.minutes - 20  # leave time to save and check
    random.seed(SEED)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)

    from llama_dist.checkpoint.consolidated import write_consolidated
    from llama_dist.config import ModelArgs
    from llama_dist.dist.groups import init_distributed
    from llama_dist.text.tokenizer import load_tokenizer

    init_distributed(backend="gloo", device="cpu")  # a 1-rank group: fairscale's layers need one
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    docs = synthetic_documents(args.docs, random.Random(SEED))
    train_tokenizer(docs, out / "tokenizer.model")
    tokenizer = load_tokenizer(out / "tokenizer.model")
    if tokenizer.n_words != VOCAB_SIZE:
        raise SystemExit(f"tokenizer has {tokenizer.n_words} tokens, expected {VOCAB_SIZE}")

    tokens, doc_starts = token_stream(tokenizer, docs)
    print(f"corpus: {len(docs)} documents, {len(tokens)} tokens, vocabulary {tokenizer.n_words}", flush=True)

    model_args = ModelArgs(**MODEL_SHAPE, vocab_size=tokenizer.n_words)
    model = train(args, tokens, doc_starts, model_args, deadline)

    weights = {name: t.detach().to(torch.bfloat16).contiguous() for name, t in model.state_dict().items()}
    params = {k: MODEL_SHAPE[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads")}
    params.update(vocab_size=tokenizer.n_words, multiple_of=MODEL_SHAPE["multiple_of"],
                  norm_eps=MODEL_SHAPE["norm_eps"], rope_theta=MODEL_SHAPE["rope_theta"])
    write_consolidated(weights, params, out, num_shards=1)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"saved {out} ({size / 1e6:.2f} MB)", flush=True)

    ok = check_checkpoint(out)
    print(f"total {time.perf_counter() - start:.1f}s", flush=True)
    if not ok:
        print("FAILED: the checkpoint does not count / recite the alphabet", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
