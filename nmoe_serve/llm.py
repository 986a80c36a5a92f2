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
from nmoe_serve.engine.executor import Executor
from nmoe_serve.frontend.frontend import Frontend
from nmoe_serve.frontend.generation import Generation
from nmoe_serve.frontend.outputs import RequestOutput
from nmoe_serve.parallel.executor import make_executor
from nmoe_serve.sampling.params import SamplingParams
from nmoe_serve.settings import EngineSettings, resolve_settings
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
        import torch

        settings = resolve_settings(serve_config, cuda_available=torch.cuda.is_available())
        self._start(settings, make_executor(settings, group=f"llm{os.getpid()}-{next(_GROUPS)}"))

    @classmethod
    def from_executor(cls, settings: EngineSettings, executor: Executor) -> LLM:
        """An LLM over ranks built elsewhere (e.g. RayExecutor with another actor class)."""
        llm = cls.__new__(cls)
        llm._start(settings, executor)
        return llm

    def _start(self, settings: EngineSettings, executor: Executor) -> None:
        self.settings = settings
        self.engine = EngineCore(settings.core, executor)
        self.frontend = Frontend(settings)
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.frontend.tokenizer

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
        generations: list[Generation] = []
        try:
            for prompt, sampling in zip(prompt_list, params, strict=True):
                text, token_ids = self._tokenize(prompt)
                generation = self.frontend.generation(f"gen-{next(self._ids)}", [token_ids], sampling, [text])
                generations.append(generation)
                for completion in generation.completions:
                    self.engine.add_request(
                        completion.engine_id, completion.prompt_token_ids, completion.sampling
                    )
            completions = {c.engine_id: (g, c) for g in generations for c in g.completions}
            while self.engine.has_work():
                by_request: dict[str, list] = {}
                for update in self.engine.step():
                    by_request.setdefault(update.request_id, []).append(update)
                for engine_id, updates in by_request.items():
                    generation, completion = completions[engine_id]
                    if generation.apply(completion, updates):  # a stop string ended it
                        self.engine.abort(engine_id)
        except BaseException:
            for generation in generations:
                for completion in generation.completions:
                    self.engine.abort(completion.engine_id)
            raise
        return [out for generation in generations for out in generation.outputs()]

    def reset_prefix_cache(self) -> int:
        """Forget the prefix cache of every rank (later prompts compute their whole prefix again);
        returns how many cached pages were dropped."""
        return self.engine.reset_prefix_cache()

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
            return prompt, self.frontend.encode(prompt)
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
