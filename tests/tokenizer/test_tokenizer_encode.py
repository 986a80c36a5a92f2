"""Tokenizer: encode/decode round trips, BOS/EOS handling, special tokens and properties."""

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nmoe_serve.tokenizer import TINY_BOS_ID, TINY_EOS_ID, TINY_VOCAB_SIZE, Tokenizer
from nmoe_serve.tokenizer.tiny import ASSISTANT_TOKEN, SPECIAL_TOKENS, THINK_BEGIN_TOKEN, USER_TOKEN

TEXTS = [
    "Hello world, the train leaves at 7:30.",
    "  leading spaces\n\nand blank lines\t tab",
    "日本語のテキスト 中文 한국어",
    "emoji 😀🎉👍🏽 and café, naïve, €5",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tiny, text):
    assert tiny.decode(tiny.encode(text)) == text
    assert tiny.decode(tiny.encode(text, add_special_tokens=False)) == text


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=60))
def test_round_trip_any_text(tiny, text):
    # Text may spell a special token; kept in the decode, it round-trips too.
    assert tiny.decode(tiny.encode(text, add_special_tokens=False), skip_special_tokens=False) == text


def test_bos_added_once_by_post_processor(tiny):
    ids = tiny.encode("hi there")
    assert ids[0] == TINY_BOS_ID
    assert ids.count(TINY_BOS_ID) == 1
    assert TINY_BOS_ID not in tiny.encode("hi there", add_special_tokens=False)


def test_bos_added_once_without_post_processor(make_checkpoint):
    tokenizer = Tokenizer.from_pretrained(make_checkpoint(post_processor=False))
    ids = tokenizer.encode("hi there")
    assert ids[0] == TINY_BOS_ID
    assert ids.count(TINY_BOS_ID) == 1
    assert ids[1:] == tokenizer.encode("hi there", add_special_tokens=False)


def test_add_bos_token_false(make_checkpoint):
    tokenizer = Tokenizer.from_pretrained(make_checkpoint(post_processor=False, add_bos_token=False))
    assert TINY_BOS_ID not in tokenizer.encode("hi there")
    assert tokenizer.bos_token_id == TINY_BOS_ID


def test_add_bos_token_defaults_to_bos_token_being_set(make_checkpoint):
    with_bos = Tokenizer.from_pretrained(make_checkpoint(post_processor=False, add_bos_token=None))
    assert with_bos.encode("hi")[0] == TINY_BOS_ID
    without_bos = Tokenizer.from_pretrained(
        make_checkpoint(post_processor=False, add_bos_token=None, bos_token=None)
    )
    assert without_bos.bos_token_id is None
    assert TINY_BOS_ID not in without_bos.encode("hi")


def test_add_eos_token(make_checkpoint):
    tokenizer = Tokenizer.from_pretrained(make_checkpoint(add_eos_token=True))
    ids = tokenizer.encode("hi there")
    assert ids[0] == TINY_BOS_ID
    assert ids[-1] == TINY_EOS_ID
    assert ids.count(TINY_EOS_ID) == 1
    assert TINY_EOS_ID not in tokenizer.encode("hi there", add_special_tokens=False)


def test_tokens_as_plain_strings(make_checkpoint):
    tokenizer = Tokenizer.from_pretrained(
        make_checkpoint(bos_token=SPECIAL_TOKENS[0], eos_token=SPECIAL_TOKENS[1], pad_token=USER_TOKEN)
    )
    assert tokenizer.bos_token_id == TINY_BOS_ID
    assert tokenizer.eos_token_id == TINY_EOS_ID
    assert tokenizer.pad_token_id == tokenizer.encode(USER_TOKEN, add_special_tokens=False)[0]


def test_without_config_file(make_checkpoint):
    checkpoint = make_checkpoint(post_processor=False)
    (checkpoint / "tokenizer_config.json").unlink()
    tokenizer = Tokenizer.from_pretrained(checkpoint)
    assert tokenizer.bos_token_id is None
    assert tokenizer.eos_token_id is None
    assert tokenizer.chat_template is None
    assert tokenizer.encode("hi") == tokenizer.encode("hi", add_special_tokens=False)


@pytest.mark.parametrize("special_token", [USER_TOKEN, ASSISTANT_TOKEN, THINK_BEGIN_TOKEN, SPECIAL_TOKENS[0]])
def test_special_token_in_text_is_one_id(tiny, special_token):
    ids = tiny.encode(f"before{special_token}after", add_special_tokens=False)
    special_id = tiny.encode(special_token, add_special_tokens=False)
    assert len(special_id) == 1
    assert special_id[0] in tiny.all_special_ids
    assert special_id[0] in ids
    assert tiny.decode(ids, skip_special_tokens=False) == f"before{special_token}after"
    assert tiny.decode(ids, skip_special_tokens=True) == "beforeafter"


def test_properties(tiny):
    assert tiny.vocab_size == TINY_VOCAB_SIZE
    assert tiny.bos_token_id == TINY_BOS_ID
    assert tiny.eos_token_id == TINY_EOS_ID
    assert tiny.all_special_ids == frozenset(range(TINY_VOCAB_SIZE - len(SPECIAL_TOKENS), TINY_VOCAB_SIZE))
    assert tiny.id_to_token(TINY_BOS_ID) == SPECIAL_TOKENS[0]
    assert tiny.id_to_token(TINY_EOS_ID) == SPECIAL_TOKENS[1]
    assert tiny.id_to_token(ord("a")) == "a"
    assert tiny.chat_template is not None


@pytest.mark.parametrize("token_id", [TINY_VOCAB_SIZE, -1])
def test_id_to_token_out_of_range(tiny, token_id):
    with pytest.raises(ValueError, match=rf"token id {token_id} is outside the vocabulary of 512 tokens"):
        tiny.id_to_token(token_id)


def test_encode_rejects_non_text(tiny):
    with pytest.raises(TypeError, match="encode takes a str, got list"):
        tiny.encode([1, 2, 3])


def test_pickles_with_its_chat_template(tiny):
    copy = pickle.loads(pickle.dumps(tiny))
    messages = [{"role": "user", "content": "hi"}]
    assert copy.apply_chat_template(messages) == tiny.apply_chat_template(messages)
    assert copy.encode("hi there") == tiny.encode("hi there")
