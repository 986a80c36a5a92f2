"""Tokenizer: text to token ids and back, read from an HF checkpoint directory.

Wraps the `tokenizers` library's `tokenizer.json` and honours the parts of
`tokenizer_config.json` that change ids or prompts: the BOS/EOS/pad tokens, whether BOS/EOS are
added, and the chat template.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer

from nmoe_serve.tokenizer.chat_template import ChatTemplate, read_chat_template

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
UNSUPPORTED_TOKENIZER_FILES = ("tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt")


class Tokenizer:
    """Encodes text to token ids and decodes ids to text for one checkpoint.

    Build it with `Tokenizer.from_pretrained(checkpoint_dir)`.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool = False,
        chat_template: str | None = None,
        source: str = "the given tokenizer",
    ) -> None:
        """Wrap a `tokenizers.Tokenizer`.

        Args:
            backend: the loaded tokenizer.json.
            bos_token, eos_token, pad_token: token strings; each must be in the vocabulary.
            add_bos_token: prepend BOS in `encode`; None means "if a bos_token is set".
            add_eos_token: append EOS in `encode`.
            chat_template: jinja2 source of the chat template, or None.
            source: where the tokenizer came from, named in error messages.
        """
        self._backend = backend
        self._source = source
        self._bos_token_id = token_id(backend, bos_token, "bos_token", source)
        self._eos_token_id = token_id(backend, eos_token, "eos_token", source)
        self._pad_token_id = token_id(backend, pad_token, "pad_token", source)
        self._bos_token = bos_token or ""
        self._eos_token = eos_token or ""
        add_bos_token = bos_token is not None if add_bos_token is None else add_bos_token
        if add_bos_token and bos_token is None:
            raise ValueError(f"add_bos_token is true but {source} sets no bos_token; set one or turn it off")
        if add_eos_token and eos_token is None:
            raise ValueError(f"add_eos_token is true but {source} sets no eos_token; set one or turn it off")
        # The post-processor of tokenizer.json may add BOS/EOS itself; an empty text shows it.
        processor_ids = backend.encode("", add_special_tokens=True).ids
        processor_adds_bos = processor_ids[:1] == [self._bos_token_id]
        processor_adds_eos = processor_ids[-1:] == [self._eos_token_id]
        self._prepended_id = self._bos_token_id if add_bos_token and not processor_adds_bos else None
        self._appended_id = self._eos_token_id if add_eos_token and not processor_adds_eos else None
        self._chat_template = ChatTemplate(chat_template, source) if chat_template is not None else None
        self._special_ids = frozenset(
            [
                *(index for index, added in backend.get_added_tokens_decoder().items() if added.special),
                *(
                    index
                    for index in (self._bos_token_id, self._eos_token_id, self._pad_token_id)
                    if index is not None
                ),
            ]
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load `tokenizer.json` and, if present, `tokenizer_config.json` from a checkpoint directory.

        Raises FileNotFoundError if the directory or its tokenizer.json is missing (also when
        only a sentencepiece `tokenizer.model` or other slow-tokenizer files are there), and
        ValueError if either file cannot be parsed or names tokens that are not in the vocabulary.
        """
        checkpoint_dir = pathlib.Path(path)
        if not checkpoint_dir.exists():
            raise FileNotFoundError(
                f"tokenizer directory {checkpoint_dir} does not exist; pass the HF checkpoint "
                f"directory that holds {TOKENIZER_FILE}"
            )
        if not checkpoint_dir.is_dir():
            raise NotADirectoryError(
                f"{checkpoint_dir} is a file; pass the HF checkpoint directory that holds {TOKENIZER_FILE}"
            )
        tokenizer_path = checkpoint_dir / TOKENIZER_FILE
        if not tokenizer_path.is_file():
            raise FileNotFoundError(missing_tokenizer_message(checkpoint_dir))
        try:
            backend = BackendTokenizer.from_file(str(tokenizer_path))
        except Exception as error:
            raise ValueError(
                f"could not load {tokenizer_path}: {error}; it must be a tokenizers-library tokenizer.json"
            ) from error
        config_path = checkpoint_dir / CONFIG_FILE
        config = read_config(config_path)
        add_bos_token = config.get("add_bos_token")
        add_eos_token = config.get("add_eos_token", False)
        for field_name, value in (("add_bos_token", add_bos_token), ("add_eos_token", add_eos_token)):
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{field_name} in {config_path} must be true or false, got {value!r}")
        return cls(
            backend,
            bos_token=token_content(config.get("bos_token"), "bos_token", config_path),
            eos_token=token_content(config.get("eos_token"), "eos_token", config_path),
            pad_token=token_content(config.get("pad_token"), "pad_token", config_path),
            add_bos_token=add_bos_token,
            add_eos_token=bool(add_eos_token),
            chat_template=read_chat_template(config, config_path),
            source=str(checkpoint_dir),
        )

    @property
    def bos_token_id(self) -> int | None:
        """Id of the beginning-of-sequence token, or None if the checkpoint sets none."""
        return self._bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        """Id of the end-of-sequence token, or None if the checkpoint sets none."""
        return self._eos_token_id

    @property
    def pad_token_id(self) -> int | None:
        """Id of the padding token, or None if the checkpoint sets none."""
        return self._pad_token_id

    @property
    def vocab_size(self) -> int:
        """Number of tokens, added tokens included (may be less than the model's embedding rows)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> frozenset[int]:
        """Ids of special added tokens plus the BOS, EOS and pad ids."""
        return self._special_ids

    @functools.cached_property
    def longest_token_bytes(self) -> int:
        """UTF-8 bytes of the longest token's text (a partial character counts as its 3-byte
        replacement): no text of n bytes encodes to fewer than n / this many tokens."""
        size = self._backend.get_vocab_size(with_added_tokens=True)
        texts = self._backend.decode_batch([[i] for i in range(size)], skip_special_tokens=False)
        return max(1, max(len(t.encode("utf-8")) for t in texts))

    @property
    def chat_template(self) -> str | None:
        """Source of the checkpoint's chat template, or None if it has none."""
        return None if self._chat_template is None else self._chat_template.source

    def id_to_token(self, token_id: int) -> str:
        """The token string of `token_id`; ValueError if the id is outside the vocabulary."""
        token = self._backend.id_to_token(token_id) if token_id >= 0 else None
        if token is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary of {self.vocab_size} tokens")
        return token

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`.

        Special tokens written literally in `text` become their single id. With
        `add_special_tokens`, BOS is prepended (and EOS appended) as the checkpoint asks, once:
        never a second time when tokenizer.json's post-processor already adds it.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}; decode ids with decode()")
        ids = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._prepended_id is not None:
            ids.insert(0, self._prepended_id)
        if add_special_tokens and self._appended_id is not None:
            ids.append(self._appended_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens are left out when `skip_special_tokens`."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> list[int] | str:
        """Render a conversation with the checkpoint's chat template.

        Args:
            messages: dicts with a string "role" and a string "content" (other keys are passed
                to the template as they are).
            add_generation_prompt: end with the cue for the assistant's reply.
            tokenize: return token ids (encoded without adding BOS, which the template writes)
                instead of text.
            tools: tool definitions, passed to the template as `tools`.
            **extra: further template variables.

        The template also sees `bos_token` and `eos_token` (the token strings, "" when the
        checkpoint sets none) and `add_generation_prompt`.

        Raises ValueError if the checkpoint has no chat template, a message is malformed (the
        message names its index) or the template rejects the conversation.
        """
        if self._chat_template is None:
            raise ValueError(
                f"the checkpoint at {self._source} has no chat_template, so it cannot take chat messages; "
                "send a plain prompt to the completions endpoint instead"
            )
        text = self._chat_template.render(
            messages,
            bos_token=self._bos_token,
            eos_token=self._eos_token,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            extra_variables=extra,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text


def token_id(backend: BackendTokenizer, token: str | None, field_name: str, source: str) -> int | None:
    """Id of `token` in `backend`, None for no token; ValueError if it is not in the vocabulary."""
    if token is None:
        return None
    index = backend.token_to_id(token)
    if index is None:
        raise ValueError(
            f"{field_name} {token!r} of {source} is not in the vocabulary of its {TOKENIZER_FILE}; "
            f"fix {field_name} in {CONFIG_FILE}"
        )
    return index


def token_content(value: Any, field_name: str, config_path: pathlib.Path) -> str | None:
    """The token string of a config field written as a string, an AddedToken dict or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(
        f"{field_name} in {config_path} must be a string or a dict with a string 'content', got {value!r}"
    )


def read_config(config_path: pathlib.Path) -> dict[str, Any]:
    """Parsed tokenizer_config.json, or {} if the file is absent."""
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON ({error}); fix or remove it") from error
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
    return config


def missing_tokenizer_message(checkpoint_dir: pathlib.Path) -> str:
    """Explain that `checkpoint_dir` lacks tokenizer.json, naming any slow-tokenizer files found."""
    present = [name for name in UNSUPPORTED_TOKENIZER_FILES if (checkpoint_dir / name).is_file()]
    message = f"no {TOKENIZER_FILE} in {checkpoint_dir}; nmoe_serve reads only the HF fast-tokenizer file {TOKENIZER_FILE}"
    if not present:
        return message + "; pass the HF checkpoint directory that holds it"
    return message + (
        f" and does not read {', '.join(present)}; convert once with transformers: "
        f"AutoTokenizer.from_pretrained(dir).save_pretrained(dir) writes {TOKENIZER_FILE}"
    )
