"""The seed's (gpt-fast fork) example, as a user runs it: `python seed_example.py CKPT` for one rank, or under
`torchrun --nproc_per_node N`. Rank 0 prints one JSON line of what it saw."""

import json
import sys

import torch

from llama_dist import ModelArgs, SentencePieceWrapper, Transformer, transformer_configs

ckpt = sys.argv[1]
config = ModelArgs(**transformer_configs["tiny"], output_hidden_states=True, output_attentions=True)
model = Transformer.from_pretrained(config, ckpt)
tokenizer = SentencePieceWrapper(f"{ckpt}/tokenizer.model")

ids = [tokenizer.bos_id()] + tokenizer.encode("one two three four")
with torch.no_grad():
    out = model(torch.tensor([ids]), torch.arange(len(ids)))
    meta = model(torch.tensor([ids]), 0)  # Meta's call on the same tokens (rewrites the same cache entries)
    generated = [int(out.logits[0, -1].argmax())]
    for position in range(len(ids), len(ids) + 5):  # greedy decoding, one position at a time, gpt-fast style
        step = model(torch.tensor([generated[-1:]]), torch.tensor([position]))
        generated.append(int(step.logits[0, -1].argmax()))

if torch.distributed.get_rank() == 0:
    print(json.dumps({
        "world_size": torch.distributed.get_world_size(),
        "logits_equal": torch.equal(out.logits, meta.logits),
        "hidden_states": len(out.hidden_states),
        "attentions": len(out.attentions),
        "n_layers": model.params.n_layers,
        "text": tokenizer.decode(generated),
        "bos_is_meta_style": tokenizer.encode("one", bos=True, eos=False)[0] == tokenizer.bos_id,
    }))
