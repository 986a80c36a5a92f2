"""Tokenizer.from_pretrained: every way a checkpoint directory can be wrong, and its message."""

import json
import re

import pytest

from nmoe_serve.tokenizer import Tokenizer


def test_missing_directory(tmp_path):
    missing = tmp_path / "no_such_checkpoint"
    with pytest.raises(
        FileNotFoundError, match=rf"{re.escape(str(missing))} does not exist.*tokenizer\.json"
    ):
        Tokenizer.from_pretrained(missing)


def test_path_is_a_file(tiny_dir):
    with pytest.raises(NotADirectoryError, match=r"is a file; pass the HF checkpoint directory"):
        Tokenizer.from_pretrained(tiny_dir / "tokenizer.json")


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"no tokenizer\.json in {re.escape(str(tmp_path))}"):
        Tokenizer.from_pretrained(tmp_path)


def test_sentencepiece_only_is_refused(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00sentencepiece")
    with pytest.raises(
        FileNotFoundError, match=r"reads only .* tokenizer\.json and does not read tokenizer\.model"
    ):
        Tokenizer.from_pretrained(tmp_path)


def test_unreadable_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"not": "a tokenizer"}', encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"could not load .*tokenizer\.json.*tokenizers-library tokenizer\.json"
    ):
        Tokenizer.from_pretrained(tmp_path)


def test_config_not_json(make_checkpoint):
    checkpoint = make_checkpoint()
    (checkpoint / "tokenizer_config.json").write_text("{broken", encoding="utf-8")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json is not valid JSON .*fix or remove it"):
        Tokenizer.from_pretrained(checkpoint)


def test_config_not_an_object(make_checkpoint):
    checkpoint = make_checkpoint()
    (checkpoint / "tokenizer_config.json").write_text("[]", encoding="utf-8")
    with pytest.raises(ValueError, match=r"must hold a JSON object, got list"):
        Tokenizer.from_pretrained(checkpoint)


def test_bos_token_not_in_vocabulary(make_checkpoint):
    checkpoint = make_checkpoint(bos_token={"content": "<s>"})
    with pytest.raises(ValueError, match=r"bos_token '<s>' of .* is not in the vocabulary.*fix bos_token"):
        Tokenizer.from_pretrained(checkpoint)


def test_token_field_of_wrong_type(make_checkpoint):
    checkpoint = make_checkpoint(eos_token=7)
    with pytest.raises(
        ValueError, match=r"eos_token in .* must be a string or a dict with a string 'content', got 7"
    ):
        Tokenizer.from_pretrained(checkpoint)


def test_add_bos_token_not_bool(make_checkpoint):
    checkpoint = make_checkpoint(add_bos_token="yes")
    with pytest.raises(ValueError, match=r"add_bos_token in .* must be true or false, got 'yes'"):
        Tokenizer.from_pretrained(checkpoint)


def test_add_bos_token_without_bos_token(make_checkpoint):
    checkpoint = make_checkpoint(bos_token=None)
    with pytest.raises(ValueError, match=r"add_bos_token is true but .* sets no bos_token"):
        Tokenizer.from_pretrained(checkpoint)


def test_add_eos_token_without_eos_token(make_checkpoint):
    checkpoint = make_checkpoint(eos_token=None, add_eos_token=True)
    with pytest.raises(ValueError, match=r"add_eos_token is true but .* sets no eos_token"):
        Tokenizer.from_pretrained(checkpoint)


def test_chat_template_not_jinja(make_checkpoint):
    checkpoint = make_checkpoint(chat_template="{% for message in messages %}")
    with pytest.raises(
        ValueError, match=r"chat template from .* is not valid jinja2 \(line 1: .*fix the template"
    ):
        Tokenizer.from_pretrained(checkpoint)


def test_chat_template_of_wrong_type(make_checkpoint):
    checkpoint = make_checkpoint(chat_template={"default": "x"})
    with pytest.raises(ValueError, match=r"chat_template in .* is a dict; expected a string or a list"):
        Tokenizer.from_pretrained(checkpoint)


def test_chat_template_list_without_default(make_checkpoint):
    checkpoint = make_checkpoint(chat_template=[{"name": "tool_use", "template": "x"}])
    with pytest.raises(ValueError, match=r"named templates \['tool_use'\] without a 'default' entry"):
        Tokenizer.from_pretrained(checkpoint)


def test_chat_template_list_uses_default(make_checkpoint):
    checkpoint = make_checkpoint(
        chat_template=[{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]
    )
    assert Tokenizer.from_pretrained(checkpoint).chat_template == "plain"


def test_chat_template_from_jinja_file(make_checkpoint):
    checkpoint = make_checkpoint(chat_template=None)
    (checkpoint / "chat_template.jinja").write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    tokenizer = Tokenizer.from_pretrained(checkpoint)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi"


def test_config_chat_template_wins_over_jinja_file(make_checkpoint):
    checkpoint = make_checkpoint(chat_template="from config")
    (checkpoint / "chat_template.jinja").write_text("from file", encoding="utf-8")
    assert Tokenizer.from_pretrained(checkpoint).chat_template == "from config"


def test_accepts_string_path(tiny_dir):
    assert Tokenizer.from_pretrained(str(tiny_dir)).vocab_size == 512


def test_config_written_as_hf_does(tiny_dir):
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["bos_token"]["__type"] == "AddedToken"
    assert config["tokenizer_class"] == "LlamaTokenizerFast"
