"""write_tiny_tokenizer: deterministic files, the advertised constants and agreement with transformers."""

import hashlib
import os
import pathlib
import subprocess
import sys

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import pre_tokenizers

import nmoe_serve.tokenizer
from nmoe_serve.tokenizer import TINY_BOS_ID, TINY_EOS_ID, TINY_VOCAB_SIZE, write_tiny_tokenizer
from nmoe_serve.tokenizer.tiny import (
    BOS_TOKEN,
    EOS_TOKEN,
    NAMED_SPECIAL_TOKENS,
    NUM_BYTE_TOKENS,
    NUM_MERGED_TOKENS,
    byte_to_unicode,
    train_bpe,
)

TEXTS = [
    "Hello world, the train leaves at 7:30.",
    "  two  spaces\n\nnew paragraph\ttab",
    "日本語 😀 café naïve",
    "<｜User｜>Where does it go?<｜Assistant｜><think>hmm</think>To the coast.<｜end▁of▁sentence｜>",
    "",
]


def file_digests(directory):
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(directory.iterdir())}


def test_two_writes_are_identical(tmp_path, tiny_dir):
    write_tiny_tokenizer(tmp_path)
    assert file_digests(tmp_path) == file_digests(tiny_dir)
    assert sorted(file_digests(tmp_path)) == ["tokenizer.json", "tokenizer_config.json"]


def test_identical_in_a_fresh_process_with_other_hash_seed(tmp_path, tiny_dir):
    script = "import pathlib, sys; from nmoe_serve.tokenizer import write_tiny_tokenizer as w; w(pathlib.Path(sys.argv[1]))"
    repo_root = pathlib.Path(nmoe_serve.tokenizer.__file__).parents[2]
    environment = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(repo_root)}
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, env=environment)
    assert file_digests(tmp_path) == file_digests(tiny_dir)


def test_vocabulary_layout(tiny_dir):
    backend = BackendTokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    assert backend.get_vocab_size(with_added_tokens=True) == TINY_VOCAB_SIZE
    assert backend.get_vocab_size(with_added_tokens=False) == NUM_BYTE_TOKENS + NUM_MERGED_TOKENS
    assert 480 <= NUM_BYTE_TOKENS + NUM_MERGED_TOKENS <= 500
    assert backend.token_to_id(BOS_TOKEN) == TINY_BOS_ID
    assert backend.token_to_id(EOS_TOKEN) == TINY_EOS_ID
    added = backend.get_added_tokens_decoder()
    assert sorted(added) == list(range(NUM_BYTE_TOKENS + NUM_MERGED_TOKENS, TINY_VOCAB_SIZE))
    assert all(token.special for token in added.values())
    assert [added[index].content for index in sorted(added)][: len(NAMED_SPECIAL_TOKENS)] == list(
        NAMED_SPECIAL_TOKENS
    )


def test_merges_compress_english(tiny):
    text = "The morning train to the coast leaves at seven."
    assert len(tiny.encode(text, add_special_tokens=False)) < len(text.encode()) / 2


def test_byte_alphabet_matches_tokenizers():
    mapping = byte_to_unicode()
    assert sorted(mapping) == list(range(256))
    assert set(mapping.values()) == set(pre_tokenizers.ByteLevel.alphabet())


def test_trainer_picks_most_frequent_pair_then_smallest():
    vocab, merges = train_bpe("ab ab cd cd", 2)
    # Pairs (a,b), (Ġ,c) and (c,d) tie at 2 first; "a" sorts first. Then (c,d) beats (Ġ,c).
    assert merges == [("a", "b"), ("c", "d")]
    assert vocab["ab"] == 256
    assert vocab["cd"] == 257


def test_trainer_reports_running_out_of_pairs():
    with pytest.raises(ValueError, match=r"corpus too small: no pairs left to merge after 1 merges"):
        train_bpe("ab", 2)


def test_transformers_agrees(tiny_dir, tiny):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    assert reference.bos_token_id == TINY_BOS_ID
    assert reference.eos_token_id == TINY_EOS_ID
    assert len(reference) == TINY_VOCAB_SIZE
    for text in TEXTS:
        ids = tiny.encode(text)
        assert reference.encode(text) == ids
        assert reference.encode(text, add_special_tokens=False) == tiny.encode(text, add_special_tokens=False)
        for skip_special_tokens in (True, False):
            assert reference.decode(ids, skip_special_tokens=skip_special_tokens) == tiny.decode(
                ids, skip_special_tokens=skip_special_tokens
            )
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where does the train go?"},
        {"role": "assistant", "content": "To the coast."},
        {"role": "user", "content": "When?"},
    ]
    for add_generation_prompt in (True, False):
        options = {"add_generation_prompt": add_generation_prompt, "tokenize": False}
        assert tiny.apply_chat_template(messages, **options) == reference.apply_chat_template(
            messages, **options
        )
