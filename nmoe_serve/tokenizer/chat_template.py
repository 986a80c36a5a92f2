"""Chat templates: find a checkpoint's template and render messages with it in a jinja2 sandbox.

The sandbox follows what HF transformers offers templates, so checkpoint templates written for
transformers render the same here: trim_blocks and lstrip_blocks, the loop-controls extension,
a `raise_exception(message)` function and a `tojson` filter that keeps non-ASCII text.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHAT_TEMPLATE_FILE = "chat_template.jinja"
DEFAULT_TEMPLATE_NAME = "default"
RESERVED_VARIABLES = frozenset({"messages", "bos_token", "eos_token", "add_generation_prompt", "tools"})


def read_chat_template(config: Mapping[str, Any], config_path: pathlib.Path) -> str | None:
    """Return the checkpoint's chat template source, or None if it has none.

    `config` is the parsed tokenizer_config.json at `config_path`. Its `chat_template` may be a
    string or a list of `{"name", "template"}` entries, of which "default" is used. Without one,
    a `chat_template.jinja` file beside the config is used, as newer HF checkpoints ship it.
    """
    template = config.get("chat_template")
    if template is None:
        template_file = config_path.parent / CHAT_TEMPLATE_FILE
        return template_file.read_text(encoding="utf-8") if template_file.is_file() else None
    if isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        default = named.get(DEFAULT_TEMPLATE_NAME)
        if not isinstance(default, str):
            raise ValueError(
                f"chat_template in {config_path} is a list of named templates {sorted(map(str, named))} "
                f"without a {DEFAULT_TEMPLATE_NAME!r} entry holding a string; add one named "
                f"{DEFAULT_TEMPLATE_NAME!r}"
            )
        return default
    raise ValueError(
        f"chat_template in {config_path} is a {type(template).__name__}; expected a string or a list "
        'of {"name": ..., "template": ...} entries'
    )


def raise_exception(message: str) -> None:
    """Let a template reject its input; the message reaches the caller as a ValueError."""
    raise jinja2.TemplateError(message)


def tojson(
    value: Any, indent: int | None = None, separators: tuple[str, str] | None = None, sort_keys: bool = False
) -> str:
    """JSON-encode `value` for a template, keeping non-ASCII characters and without HTML escaping."""
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def check_messages(messages: Any) -> None:
    """Raise ValueError unless `messages` is a non-empty list of dicts with string role and content."""
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty; send at least one message")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(
                f"messages[{index}] must be a dict with 'role' and 'content', got {type(message).__name__}"
            )
        role = message.get("role")
        if not isinstance(role, str):
            raise ValueError(f"messages[{index}] needs a string 'role', got {role!r}")
        content = message.get("content")
        if not isinstance(content, str):
            raise ValueError(
                f"messages[{index}] (role {role!r}) needs a string 'content', got {type(content).__name__}"
            )


class ChatTemplate:
    """A compiled chat template that renders a conversation into prompt text."""

    def __init__(self, source: str, origin: str) -> None:
        """Compile `source`; `origin` names where it came from, for error messages.

        Raises ValueError if the template is not valid jinja2.
        """
        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        environment.globals["raise_exception"] = raise_exception
        environment.filters["tojson"] = tojson
        try:
            self._template = environment.from_string(source)
        except jinja2.TemplateSyntaxError as error:
            raise ValueError(
                f"chat template from {origin} is not valid jinja2 (line {error.lineno}: {error.message}); "
                "fix the template in the checkpoint"
            ) from error
        self.source = source
        self.origin = origin

    def __reduce__(self) -> tuple[type[ChatTemplate], tuple[str, str]]:
        # Compiled jinja2 templates do not pickle; recompile from source (Ray ships tokenizers).
        return ChatTemplate, (self.source, self.origin)

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        bos_token: str,
        eos_token: str,
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None,
        extra_variables: Mapping[str, Any],
    ) -> str:
        """Render `messages` to text; ValueError if they are malformed or the template rejects them."""
        check_messages(messages)
        collisions = RESERVED_VARIABLES.intersection(extra_variables)
        if collisions:
            raise ValueError(
                f"extra template variables {sorted(collisions)} collide with the ones the tokenizer sets; "
                "rename them"
            )
        try:
            return self._template.render(
                **extra_variables,
                messages=messages,
                bos_token=bos_token,
                eos_token=eos_token,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
            )
        except jinja2.TemplateError as error:
            raise ValueError(f"chat template rejected the messages: {error}") from error
