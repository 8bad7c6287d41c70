"""A small Hugging Face tokenizer directory for tests: a byte-level BPE trained here on text of our own, laid out
like Llama 3's (`tokenizer.json` with a BOS post-processor, special tokens after the merges), saved by
transformers with a Llama-3-style chat template in tokenizer_config.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from llama_dist.text.tokenizer import _LLAMA3_PAT

NAMED_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# Llama-3-style, written to lean on what transformers' jinja environment does: the indented block tags only
# vanish with lstrip_blocks, the newlines after them only with trim_blocks, tool results go through tojson
# (no HTML escaping, no ASCII escaping), an unknown role calls raise_exception, and {% continue %} needs the
# loopcontrols extension.
LLAMA3_STYLE_TEMPLATE = """{{ bos_token -}}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant', 'ipython'] %}
        {{ raise_exception('Unknown role: ' + message['role']) }}
    {% endif %}
    {% if message['role'] == 'system' and not message['content'] %}
        {% continue %}
    {% endif %}
<|start_header_id|>{{ message['role'] }}<|end_header_id|>

{% if message['content'] is mapping %}
{{ message['content'] | tojson }}
{%- else %}
{{ message['content'] | trim }}
{%- endif %}
<|eot_id|>
{%- endfor %}
{% if add_generation_prompt %}
<|start_header_id|>assistant<|end_header_id|>

{% endif %}
"""

_WORDS = [
    "the", "model", "token", "llama", "answer", "question", "hello", "world", "system", "user", "assistant",
    "prompt", "def", "return", "class", "import", "café", "naïve", "Straße", "你好", "世界", "日本語", "👋", "🔥",
    "12345", "3.14", "it's", "they'll", "<tag>", "{\"key\": 1}", "\t", "  ", "\n", "\n\n",
]


def training_text() -> list[str]:
    lines = []
    for i in range(1500):
        lines.append(" ".join(_WORDS[(i * 7 + k * 5) % len(_WORDS)] for k in range(2 + i % 11)))
    return lines


def write_hf_tokenizer(
    out_dir: Path,
    total_vocab: int = 384,
    chat_template: str | None = LLAMA3_STYLE_TEMPLATE,
    eos_token: str = "<|end_of_text|>",
) -> Path:
    """Write tokenizer.json + tokenizer_config.json (with `chat_template`) into `out_dir`; return the
    tokenizer.json path. The vocabulary holds exactly `total_vocab` ids: merges, then the named special tokens,
    then reserved special tokens, as Llama 3's does."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_PAT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=total_vocab - len(NAMED_SPECIALS) - 4,  # leave room for a few reserved tokens
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_text(), trainer)
    reserved = total_vocab - tokenizer.get_vocab_size() - len(NAMED_SPECIALS)
    assert reserved >= 0, "the trainer learnt more tokens than asked for"
    names = NAMED_SPECIALS + [f"<|reserved_special_token_{i}|>" for i in range(reserved)]
    tokenizer.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in names])
    assert tokenizer.get_vocab_size(with_added_tokens=True) == total_vocab
    bos_id = tokenizer.token_to_id("<|begin_of_text|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
        special_tokens=[("<|begin_of_text|>", bos_id)],
    )
    wrapper = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|begin_of_text|>", eos_token=eos_token, chat_template=chat_template
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapper.save_pretrained(str(out_dir), save_jinja_files=False)  # the template stays in tokenizer_config.json
    return out_dir / "tokenizer.json"


def write_json(path: Path, value: dict) -> Path:
    path.write_text(json.dumps(value))
    return path


def write_hf_checkpoint(tmp_path_factory, name: str, chat_template: str, seed: int) -> Path:
    """A random tiny checkpoint named `name` with a Hugging Face tokenizer whose chat template is `chat_template`."""
    from helpers import tiny_args, write_checkpoint

    tokenizer_dir = tmp_path_factory.mktemp(f"{name}_tokenizer")
    write_hf_tokenizer(tokenizer_dir, chat_template=chat_template)
    ckpt = tmp_path_factory.mktemp(f"{name}_ckpt") / name
    write_checkpoint(ckpt, tiny_args(vocab_size=384), seed=seed)
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, ckpt / f.name)
    return ckpt
