"""Fixtures shared by the tokenizer tests: the tiny checkpoint and helpers to make variants of it."""

import json
import pathlib

import pytest

from nmoe_serve.tokenizer import Tokenizer, write_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> pathlib.Path:
    """A directory holding the tiny tokenizer's files (shared; do not modify)."""
    out_dir = tmp_path_factory.mktemp("tiny_tokenizer")
    write_tiny_tokenizer(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny(tiny_dir) -> Tokenizer:
    """The tiny tokenizer, loaded through Tokenizer.from_pretrained."""
    return Tokenizer.from_pretrained(tiny_dir)


@pytest.fixture
def make_checkpoint(tmp_path):
    """Write a variant of the tiny checkpoint: config fields overridden (None removes one).

    `post_processor=False` drops tokenizer.json's post-processor.
    """

    def make(post_processor: bool = True, **config_overrides) -> pathlib.Path:
        out_dir = tmp_path / "checkpoint"
        write_tiny_tokenizer(out_dir)
        if not post_processor:
            tokenizer_json = json.loads((out_dir / "tokenizer.json").read_text(encoding="utf-8"))
            tokenizer_json["post_processor"] = None
            (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer_json), encoding="utf-8")
        config_path = out_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        for key, value in config_overrides.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        config_path.write_text(json.dumps(config), encoding="utf-8")
        return out_dir

    return make
