"""LLM: the offline API. Prompts in, completions out, through the same engine the server runs.

llm = LLM(config="configs/dev.toml")                 # or LLM("/path/to/checkpoint", dtype="bfloat16")
outputs = llm.generate(["Hello", [1, 2, 3]], SamplingParams(max_tokens=32))
outputs[0].outputs[0].text
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nmoe_serve.config import ServeConfig
from nmoe_serve.engine.core import EngineCore
from nmoe_serve.engine.executor import make_executor
from nmoe_serve.engine.output_processor import OutputProcessor, child_request_ids, child_sampling
from nmoe_serve.engine.outputs import RequestOutput
from nmoe_serve.engine.settings import EngineSettings, resolve_settings
from nmoe_serve.sampling.params import SamplingParams
from nmoe_serve.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Prompt = str | Sequence[int] | dict[str, Any]
_GROUPS = itertools.count()  # EP group names of this process's engines


class LLM:
    """An engine in this process.

    Args:
        model: checkpoint directory (HF layout). Replaces the config's model source when both are given.
        config: a TOML file or a ServeConfig; without one, defaults apply around `model`.
        **options: engine options overriding the config, by field name: dtype ("auto" takes the
            checkpoint's; bfloat16, float16, float32), max_seq_len, load_format, page_size,
            num_pages, max_num_seqs, max_prefill_tokens, ep_size, device ("auto", "cpu", "cuda"),
            ... (`nmoe_serve.config.override_keys()` lists them all).
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        config: str | Path | ServeConfig | None = None,
        **options: Any,
    ):
        if model is None and config is None:
            raise ValueError(
                "LLM needs a model (a checkpoint directory) or a config (a TOML file or ServeConfig)"
            )
        if model is not None:
            options = {**options, "path": str(model), "tiny": None}
        if config is None:
            serve_config = ServeConfig.from_dict({"model": {}}, source="LLM()", overrides=options)
        elif isinstance(config, ServeConfig):
            serve_config = ServeConfig.from_dict(
                config.model_dump(), source="LLM(config=...)", overrides=options
            )
        else:
            serve_config = ServeConfig.from_toml(config, overrides=options)
        self.settings: EngineSettings = resolve_settings(serve_config)
        self.engine = EngineCore(
            self.settings, make_executor(self.settings, group=f"llm{os.getpid()}-{next(_GROUPS)}")
        )
        self.tokenizer = _load_tokenizer(self.settings.tokenizer_path)
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs in prompt order.

        A prompt is a string, a list of token ids, or {"prompt": str} / {"prompt_token_ids": [...]}.
        `sampling_params` is one SamplingParams for all prompts or one per prompt.
        """
        prompt_list = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (
            [sampling_params] * len(prompt_list)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params) != len(prompt_list):
            raise ValueError(
                f"got {len(params)} SamplingParams for {len(prompt_list)} prompts: pass one, or one per prompt"
            )
        processor = OutputProcessor(self.tokenizer)
        outputs: list[RequestOutput] = []
        try:
            for prompt, sampling in zip(prompt_list, params, strict=True):
                text, token_ids = self._tokenize(prompt)
                request_id = f"gen-{next(self._ids)}"
                outputs.append(processor.add(request_id, text, token_ids, sampling))
                for i, child in enumerate(child_request_ids(request_id, sampling.n)):
                    self.engine.add_request(child, token_ids, child_sampling(sampling, i))
            while self.engine.has_work():
                _, stopped = processor.process(self.engine.step())
                for child in stopped:
                    self.engine.abort(child)
        except BaseException:
            for out in outputs:
                for child in child_request_ids(out.request_id, len(out.outputs)):
                    self.engine.abort(child)
            raise
        return outputs

    def shutdown(self) -> None:
        self.engine.shutdown()

    def _tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), _token_ids(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError(
                    f"a dict prompt needs 'prompt' or 'prompt_token_ids'; got keys {sorted(prompt)}"
                )
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    f"text prompts need a tokenizer, and {self.settings.tokenizer_path} has no tokenizer.json: "
                    "pass token ids instead, or set model.tokenizer to a directory with tokenizer.json"
                )
            return prompt, self.tokenizer.encode(prompt)
        return None, _token_ids(prompt)


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    items: list[Any] = list(prompts)
    if items and all(isinstance(t, int) and not isinstance(t, bool) for t in items):
        return [items]  # one prompt of token ids
    return items


def _token_ids(value: Any) -> list[int]:
    ids = list(value)
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ValueError("prompt_token_ids must be a list of integers")
    return ids


def _load_tokenizer(path: Path) -> Tokenizer | None:
    try:
        return Tokenizer.from_pretrained(path)
    except FileNotFoundError as e:
        log.warning("no tokenizer (%s); token-id prompts still work", e)
        return None
