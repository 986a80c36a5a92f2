"""IncrementalDetokenizer: turn a stream of generated token ids into a stream of text deltas.

Byte-level BPE tokens can end in the middle of a multibyte UTF-8 character, which decodes to
U+FFFD until the rest arrives. The detokenizer keeps a short window of ids: the ids already
shown (the prefix) and the ids not yet shown. Each step decodes the window with and without the
unshown ids and returns the difference, holding it back while it ends in U+FFFD. Once text is
shown, the window drops everything before the newly shown ids, so each step costs O(1) in the
length of the generation.
"""

from __future__ import annotations

from collections.abc import Sequence

from nmoe_serve.tokenizer.tokenizer import Tokenizer

PROMPT_CONTEXT_TOKENS = 5
"""How many trailing prompt ids are decoded with the first generated ids, for left context."""

REPLACEMENT_CHARACTER = "\ufffd"


class IncrementalDetokenizer:
    """Text of one request's generated tokens, produced a few tokens at a time.

    Joined together, the deltas returned by `add` equal `tokenizer.decode(generated_ids,
    skip_special_tokens)` whenever the generated ids end on a complete character. Text ending
    in an incomplete character (or in a literal U+FFFD) is held back until a later token
    completes it.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        """Start after `prompt_token_ids`, which give context only: they are never part of `text`."""
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context_ids = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        if self._decode(context_ids).endswith(REPLACEMENT_CHARACTER):
            context_ids = []  # a prompt cut inside a character would make the first diff wrong
        self._window_ids = context_ids
        self._shown_count = len(context_ids)
        self._text = ""

    @property
    def text(self) -> str:
        """All text shown so far (the concatenation of the deltas `add` returned)."""
        return self._text

    def add(self, new_token_ids: Sequence[int]) -> str:
        """Take the next generated ids; return the text they complete (possibly "")."""
        if not new_token_ids:
            return ""
        self._window_ids.extend(new_token_ids)
        window_text = self._decode(self._window_ids)
        if window_text.endswith(REPLACEMENT_CHARACTER):
            return ""
        shown_text = self._decode(self._window_ids[: self._shown_count])
        delta = window_text[len(shown_text) :]
        self._window_ids = self._window_ids[self._shown_count :]
        self._shown_count = len(self._window_ids)
        self._text += delta
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)
