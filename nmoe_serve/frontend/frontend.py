"""Frontend: what the offline API and the HTTP ingress share before and after the engine.

It holds the model's tokenizer and limits, turns prompts (text, token ids, chat messages) into
validated token ids, and fans a request out into its engine requests (`Generation`). No torch
and no Ray here: the ingress replica runs it without either of them loading.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from nmoe_serve.frontend.generation import Generation
from nmoe_serve.frontend.validation import InvalidRequest, check_request
from nmoe_serve.sampling.params import SamplingParams
from nmoe_serve.settings import EngineSettings
from nmoe_serve.tokenizer import Tokenizer, tiny_tokenizer

log = logging.getLogger(__name__)


def load_tokenizer(settings: EngineSettings) -> Tokenizer | None:
    """The model's tokenizer (a tiny model's is built in memory), or None without tokenizer.json."""
    if settings.tiny is not None and settings.tokenizer_path == settings.model_path:
        return tiny_tokenizer()
    try:
        return Tokenizer.from_pretrained(settings.tokenizer_path)
    except FileNotFoundError as e:
        log.warning("no tokenizer (%s): only token-id prompts will work", e)
        return None


# Margin of the byte bound over the longest token: a normalizer may shorten text before it is
# split (NFKC folds some 3-byte characters into 2 bytes), so the bound never refuses a text that fits.
NORMALIZATION_MARGIN = 2


class Frontend:
    def __init__(self, settings: EngineSettings, tokenizer: Tokenizer | None = None) -> None:
        self.model_name = settings.model_name
        self.vocab_size = settings.args.vocab_size
        self.max_seq_len = settings.core.max_seq_len
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(settings)
        longest = self.tokenizer.longest_token_bytes if self.tokenizer is not None else 0
        # A text longer than this cannot fit the context whatever it says: every token of it
        # covers at most `longest` bytes.
        self.max_text_bytes = self.max_seq_len * longest * NORMALIZATION_MARGIN

    def check_text_fits(self, texts: Sequence[str], param: str) -> None:
        """Refuse, before tokenizing, a text too long to fit the context in any tokenization."""
        for text in texts:
            if len(text) * 4 <= self.max_text_bytes:  # no UTF-8 character is longer than 4 bytes
                continue
            size = len(text.encode("utf-8", errors="replace"))
            if size > self.max_text_bytes:
                raise InvalidRequest(
                    f"the text of {param} has {size} bytes, more than this model's context of "
                    f"{self.max_seq_len} tokens can hold (at most {self.max_text_bytes} bytes): shorten it",
                    param,
                    "context_length_exceeded",
                )

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequest(
                "this model has no tokenizer (no tokenizer.json): send the prompt as token ids", "prompt"
            )
        return self.tokenizer.encode(text)

    def chat_prompt(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """The token ids of `messages` rendered by the model's chat template."""
        if self.tokenizer is None or self.tokenizer.chat_template is None:
            raise InvalidRequest("this model has no chat template: send a prompt to /v1/completions instead")
        try:
            ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=True
            )
        except ValueError as e:
            raise InvalidRequest(f"the messages cannot be rendered: {e}", "messages") from None
        return list(ids)  # type: ignore[arg-type]

    def generation(
        self,
        request_id: str,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams,
        prompt_texts: Sequence[str | None] | None = None,
    ) -> Generation:
        """Validate a request and fan it out (InvalidRequest names what is wrong)."""
        check_request(prompts, sampling, self.vocab_size, self.max_seq_len)
        return Generation.fan_out(request_id, prompts, sampling, self.tokenizer, prompt_texts)
