"""Tokenization for nmoe_serve: token ids from text and chat messages, text from ids.

- `Tokenizer`: reads an HF checkpoint's tokenizer.json and tokenizer_config.json.
- `IncrementalDetokenizer`: streams generated ids as text without breaking UTF-8 characters.
- `write_tiny_tokenizer` / `tiny_tokenizer`: a small deterministic tokenizer for random test
  checkpoints, written to files or built in memory.
"""

from nmoe_serve.tokenizer.detokenizer import IncrementalDetokenizer
from nmoe_serve.tokenizer.tiny import (
    TINY_BOS_ID,
    TINY_EOS_ID,
    TINY_VOCAB_SIZE,
    tiny_tokenizer,
    write_tiny_tokenizer,
)
from nmoe_serve.tokenizer.tokenizer import Tokenizer

__all__ = [
    "TINY_BOS_ID",
    "TINY_EOS_ID",
    "TINY_VOCAB_SIZE",
    "IncrementalDetokenizer",
    "Tokenizer",
    "tiny_tokenizer",
    "write_tiny_tokenizer",
]
