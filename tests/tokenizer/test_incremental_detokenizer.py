"""IncrementalDetokenizer: deltas never split a UTF-8 character and join to the full decode."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nmoe_serve.tokenizer import TINY_VOCAB_SIZE, IncrementalDetokenizer
from nmoe_serve.tokenizer.tiny import SPECIAL_TOKENS

REPLACEMENT_CHARACTER = "\ufffd"

# Multibyte characters (2, 3 and 4 bytes, and combining sequences) are drawn often on purpose.
MULTIBYTE = ["é", "ß", "€", "日", "本", "한", "テ", "😀", "🚂", "👍🏽", "👩\u200d🚀", "e\u0301"]
characters = st.one_of(
    st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters=REPLACEMENT_CHARACTER),
    st.sampled_from(MULTIBYTE),
)
plain_text = st.lists(characters, max_size=30).map("".join)
text_with_special_tokens = st.lists(st.one_of(plain_text, st.sampled_from(SPECIAL_TOKENS)), max_size=6).map(
    "".join
)
chunk_sizes = st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=8)


def feed(detokenizer, ids, sizes):
    """Give `ids` to `detokenizer` in chunks of `sizes` (cycled); return the deltas."""
    deltas = []
    start = 0
    index = 0
    while start < len(ids):
        size = sizes[index % len(sizes)]
        deltas.append(detokenizer.add(ids[start : start + size]))
        start += size
        index += 1
    return deltas


@settings(max_examples=150, deadline=None)
@given(
    prompt=text_with_special_tokens,
    generated=text_with_special_tokens,
    sizes=chunk_sizes,
    skip_special_tokens=st.booleans(),
)
def test_deltas_join_to_full_decode(tiny, prompt, generated, sizes, skip_special_tokens):
    prompt_ids = tiny.encode(prompt)
    generated_ids = tiny.encode(generated, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tiny, prompt_ids, skip_special_tokens=skip_special_tokens)
    deltas = feed(detokenizer, generated_ids, sizes)
    full_text = tiny.decode(generated_ids, skip_special_tokens=skip_special_tokens)
    assert "".join(deltas) == full_text
    assert detokenizer.text == full_text
    assert not any(REPLACEMENT_CHARACTER in delta for delta in deltas)


@settings(max_examples=150, deadline=None)
@given(
    prompt_ids=st.lists(st.integers(0, TINY_VOCAB_SIZE - 1), max_size=8),
    generated_ids=st.lists(st.integers(0, TINY_VOCAB_SIZE - 1), max_size=40),
    sizes=chunk_sizes,
    skip_special_tokens=st.booleans(),
)
def test_arbitrary_ids_never_show_an_unfinished_tail(
    tiny, prompt_ids, generated_ids, sizes, skip_special_tokens
):
    detokenizer = IncrementalDetokenizer(tiny, prompt_ids, skip_special_tokens=skip_special_tokens)
    deltas = feed(detokenizer, generated_ids, sizes)
    shown = "".join(deltas)
    full_text = tiny.decode(generated_ids, skip_special_tokens=skip_special_tokens)
    assert full_text.startswith(shown)
    assert not any(delta.endswith(REPLACEMENT_CHARACTER) for delta in deltas)
    if not full_text.endswith(REPLACEMENT_CHARACTER):
        assert shown == full_text


def test_emoji_split_over_byte_tokens_is_held_back(tiny):
    emoji_ids = tiny.encode("😀", add_special_tokens=False)
    assert len(emoji_ids) == 4
    detokenizer = IncrementalDetokenizer(tiny, tiny.encode("Hi"))
    assert [detokenizer.add([token_id]) for token_id in emoji_ids] == ["", "", "", "😀"]
    assert detokenizer.add(tiny.encode(" ok", add_special_tokens=False)) == " ok"
    assert detokenizer.text == "😀 ok"


def test_prompt_is_context_not_output(tiny):
    prompt_ids = tiny.apply_chat_template([{"role": "user", "content": "Where does the train go?"}])
    detokenizer = IncrementalDetokenizer(tiny, prompt_ids)
    assert detokenizer.add(tiny.encode(" To the coast", add_special_tokens=False)) == " To the coast"
    assert detokenizer.text == " To the coast"


@pytest.mark.parametrize(
    ("skip_special_tokens", "expected"), [(True, "yes"), (False, "yes<｜end▁of▁sentence｜>")]
)
def test_special_tokens_follow_skip_flag(tiny, skip_special_tokens, expected):
    detokenizer = IncrementalDetokenizer(tiny, [], skip_special_tokens=skip_special_tokens)
    detokenizer.add(tiny.encode("yes", add_special_tokens=False))
    detokenizer.add([tiny.eos_token_id])
    assert detokenizer.text == expected


def test_empty_add_returns_nothing(tiny):
    detokenizer = IncrementalDetokenizer(tiny, tiny.encode("Hi"))
    assert detokenizer.add([]) == ""
    assert detokenizer.text == ""


def test_window_stays_short(tiny):
    detokenizer = IncrementalDetokenizer(tiny, tiny.encode("Hi"))
    for token_id in tiny.encode("the train to the coast leaves at seven " * 20, add_special_tokens=False):
        detokenizer.add([token_id])
        assert len(detokenizer._window_ids) <= 2
