"""The incremental detokenizer (text/detokenizer.py): released pieces never split a character, add up to the whole
decoded text, and a stop string spanning several tokens ends the text before it, checked on the new tail only."""

import pytest

from llama_dist.text.detokenizer import CompletionText, IncrementalDecoder
from llama_dist.text.tokenizer import load_tokenizer

TEXT = "Le café naïve crème brûlée: 3×4 = 12 — ok ✓ 北京 done."


@pytest.fixture(scope="module")
def tokenizer(spm_model_path):
    return load_tokenizer(spm_model_path)


def _byte_split_ids(tokenizer) -> list[int]:
    """The text's ids, where characters outside the vocabulary come as byte tokens: several per character."""
    ids = tokenizer.encode(TEXT)
    assert tokenizer.decode(ids) == TEXT
    return ids


def test_pieces_never_split_a_character_and_add_up_to_the_text(tokenizer):
    ids = _byte_split_ids(tokenizer)
    decoder, pieces, held = IncrementalDecoder(tokenizer), [], 0
    for token in ids:
        piece = decoder.add(token)
        assert "\ufffd" not in piece
        held += piece == ""
        pieces.append(piece)
    pieces.append(decoder.flush())
    assert "".join(pieces) == TEXT
    assert held > 0  # some characters did span several tokens


@pytest.mark.parametrize("stop", ["crème brûlée", "北京", "= 12 —"])
def test_a_stop_string_across_tokens_ends_the_text_before_it(tokenizer, stop):
    completion = CompletionText(tokenizer, stop=[stop, "never there"])
    released = []
    for token in _byte_split_ids(tokenizer):
        completion.add(token)
        released.append(completion.release()[0])
        if completion.stopped:
            break
    assert completion.stopped
    assert "".join(released) == completion.text == TEXT[: TEXT.index(stop)]


def test_a_partial_character_at_the_end_is_released_by_end(tokenizer):
    ids = _byte_split_ids(tokenizer)
    cut = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    completion = CompletionText(tokenizer)
    for token in ids[:cut]:
        completion.add(token)
    assert "\ufffd" not in completion.release()[0]
    completion.end()
    assert completion.text.endswith("\ufffd") and completion.release()[0].endswith("\ufffd")
