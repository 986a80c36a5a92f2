"""ServeConfig: every setting of a deployment, read from TOML and checked before anything starts.

A TOML file has one table per section (`[model]`, `[parallel]`, `[cache]`, `[scheduler]`,
`[device]`, `[server]`, `[speculative]`). String values may use `${VAR}` or `${VAR:-default}`,
replaced from the environment.
Unknown keys, wrong types and impossible combinations raise ConfigError naming the key, the value
and the fix. The config is frozen once built; values that depend on the checkpoint or the hardware
("auto") are resolved once, at engine start, into the engine's own frozen settings.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration value is missing, malformed or impossible; the message says how to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class TinyModelSpec(_Section):
    """A tiny random DeepSeek-V3 checkpoint, built on first use into the cache directory."""

    seed: int = Field(0, ge=0, description="random seed of the weights")
    fp8: bool = Field(False, description="write FP8 e4m3 weights with 128x128 block scales")


class ModelSection(_Section):
    path: str | None = Field(
        None, description="directory of an HF-layout DeepSeek-V3 checkpoint (config.json + *.safetensors)"
    )
    tiny: TinyModelSpec | None = Field(
        None, description="use a tiny random checkpoint built automatically (for CPU development and tests)"
    )
    tokenizer: str | None = Field(
        None, description="directory with tokenizer.json; defaults to the model path"
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="compute dtype; auto takes the checkpoint's torch_dtype"
    )
    load_format: Literal["auto", "safetensors", "dummy"] = Field(
        "auto",
        description="dummy fills weights with random values of the right shapes without reading files",
    )
    max_seq_len: int | None = Field(
        None, ge=2, description="longest sequence (prompt + output) served; default: the model's maximum"
    )
    name: str | None = Field(
        None, description="model name reported by the API; default: the path's last part"
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if (self.path is None) == (self.tiny is None):
            raise ValueError(
                "set exactly one of model.path (a checkpoint directory) or model.tiny (a tiny random "
                "checkpoint, e.g. `tiny = { seed = 0 }`)"
            )
        return self


class ParallelSection(_Section):
    ep_size: int = Field(1, ge=1, le=64, description="expert-parallel ranks (GPUs) per group")
    step_timeout_s: float = Field(
        120.0,
        gt=0,
        description="longest wait for one step on all ranks (and for any collective) before the group restarts",
    )
    start_timeout_s: float = Field(
        900.0, gt=0, description="longest wait for the group's workers to be placed, load weights and join"
    )


class CacheSection(_Section):
    page_size: int = Field(64, ge=1, le=1024, description="tokens per KV page")
    num_pages: int | None = Field(
        None, ge=1, description="KV pages per rank; default: from memory left after the weights"
    )
    memory_utilization: float = Field(
        0.9, gt=0.0, le=0.98, description="fraction of GPU memory the rank may use (weights + KV)"
    )
    cpu_kv_cache_gib: float = Field(
        1.0, gt=0.0, description="KV cache size per rank on CPU when num_pages is not set"
    )
    kv_dtype: Literal["auto", "fp8"] = Field(
        "auto",
        description="the latent KV cache's storage: 'auto' the model's dtype; 'fp8' float8 e4m3 with a "
        "float32 scale per token for the latent and one for the rope key (592 bytes a token for "
        "DeepSeek-V3 against 1152 in bf16: ~1.95x the tokens per GiB; decode runs the FP8 MLA kernel)",
    )
    enable_prefix_caching: bool = Field(
        True,
        description="keep the full KV pages of finished and running requests, per rank, and reuse them "
        "for later requests with the same prefix (evicted least recently used when pages run short)",
    )
    max_rank_imbalance: int = Field(
        4,
        ge=0,
        description="running sequences a prefix-cache hit may put on a rank beyond the least loaded rank "
        "that could take the request: bounds how far a hot prefix concentrates traffic (0: the least "
        "loaded ranks only, the cache breaking ties)",
    )

    @model_validator(mode="after")
    def _page_size_power_of_two(self) -> CacheSection:
        if self.page_size & (self.page_size - 1):
            raise ValueError(f"cache.page_size={self.page_size} must be a power of two (e.g. 16, 64)")
        return self


class SchedulerSection(_Section):
    max_num_seqs: int = Field(256, ge=1, description="most running sequences per rank (the decode batch)")
    max_prefill_tokens: int = Field(
        8192, ge=1, description="most prompt tokens per rank in one prefill step (chunked prefill)"
    )
    max_prefill_steps_in_a_row: int = Field(
        4, ge=1, description="prefill steps allowed before running decodes get a step"
    )
    admission_watermark: float = Field(
        0.01, ge=0.0, lt=1.0, description="fraction of a rank's pages kept free when admitting requests"
    )
    decode_prefill_tokens: int | None = Field(
        None,
        ge=1,
        description="prompt tokens per rank in one prefill step while sequences decode: bounds their "
        "inter-token latency (size it from the step cost with `nmoe-serve simulate`); default: "
        "max_prefill_tokens",
    )
    overlap: bool = Field(
        True,
        description="launch step n+1 while step n's results come back (the ranks never wait for the "
        "coordinator's bookkeeping); requests learn of their end one step late: at most one wasted "
        "row, never an extra token",
    )


class DeviceSection(_Section):
    kind: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto takes CUDA when present")
    seed: int = Field(0, ge=0, description="seed of the sampler for requests without their own seed")
    kernels: Literal["auto", "torch"] = Field(
        "auto",
        description="auto: Triton kernels with FP8 weights kept FP8 on CUDA with bfloat16/float16 compute, "
        "the torch reference elsewhere; torch: the torch reference everywhere (FP8 dequantized at load)",
    )
    cuda_graphs: bool = Field(
        True,
        description="replay decode steps from CUDA graphs captured at start-up (CUDA with Triton kernels)",
    )
    cuda_graph_max_batch: int | None = Field(
        None,
        ge=1,
        description="largest decode batch (token rows) captured in a graph (default: scheduler.max_num_seqs, "
        "times 1 + speculative.num_draft_tokens with speculative decoding); larger batches run eagerly",
    )


class SpeculativeSection(_Section):
    method: Literal["none", "mtp"] = Field(
        "none",
        description="speculative decoding: mtp drafts tokens with the checkpoint's multi-token-prediction "
        "layer (DeepSeek-V3's num_nextn_predict_layers = 1) and verifies them in the next decode step; "
        "none decodes one token per step",
    )
    num_draft_tokens: int = Field(
        1,
        ge=1,
        le=4,
        description="tokens drafted per sequence per step (mtp: 1 uses the layer once, more reuse it "
        "autoregressively); a verify step carries 1 + num_draft_tokens tokens per sequence",
    )


class ServerSection(_Section):
    api_key: str | None = Field(
        None, description="bearer token the HTTP API requires (empty or unset: no authentication)"
    )
    max_body_bytes: int = Field(16 * 2**20, ge=1024, description="largest request body accepted (413 above)")
    max_waiting_requests: int = Field(
        4096, ge=1, description="requests queued per EP group before new ones get 429 Too Many Requests"
    )
    max_inflight_sequences: int | None = Field(
        None,
        ge=1,
        description="engine requests (prompts x n) one ingress replica keeps in flight before new ones get "
        "503; default: the groups' capacity (ep_groups x (ep_size x max_num_seqs + max_waiting_requests)) "
        "shared among the ingress replicas",
    )
    max_sequences_per_request: int = Field(
        256, ge=1, description="most engine requests (prompts x n) one HTTP request may ask for (400 above)"
    )
    default_max_tokens: int | None = Field(
        None,
        ge=1,
        description="max_tokens of a chat request that sets none; unset: up to the end of the context, as "
        "vLLM does (completions keep OpenAI's default of 16)",
    )
    retry_after_s: int = Field(1, ge=1, description="the Retry-After seconds sent with 429 and 503")
    ingress_replicas: int = Field(1, ge=1, description="replicas of the HTTP ingress deployment")
    ep_groups: int = Field(1, ge=1, description="EP groups (coordinator replicas), one per 8-GPU node")
    group_affinity_tokens: int = Field(
        256,
        ge=1,
        description="leading prompt tokens that choose a request's EP group (requests that share them go "
        "to the same group, whose prefix cache then serves them)",
    )
    group_max_imbalance: int = Field(
        8,
        ge=0,
        description="engine requests in flight a group may have beyond the least loaded group and still "
        "get the requests whose prefix it is chosen for (past it, the next group in the hash order)",
    )


class ServeConfig(_Section):
    """The whole configuration of one deployment."""

    model: ModelSection
    parallel: ParallelSection = ParallelSection()
    cache: CacheSection = CacheSection()
    scheduler: SchedulerSection = SchedulerSection()
    device: DeviceSection = DeviceSection()
    server: ServerSection = ServerSection()
    speculative: SpeculativeSection = SpeculativeSection()

    @model_validator(mode="after")
    def _speculative_steps_one_at_a_time(self) -> ServeConfig:
        if self.speculative.method != "none" and self.scheduler.overlap:
            raise ValueError(
                f"speculative.method = {self.speculative.method!r} runs its steps one at a time (the next "
                "verify step needs this one's accepted tokens and drafts): set scheduler.overlap = false, "
                "or speculative.method = 'none' to keep overlapped steps"
            )
        return self

    @model_validator(mode="after")
    def _cache_holds_one_sequence(self) -> ServeConfig:
        need = self.pages_for_one_sequence()
        if need is not None and self.cache.num_pages is not None and self.cache.num_pages < need:
            raise ValueError(
                f"cache.num_pages={self.cache.num_pages} is too few for one sequence of "
                f"model.max_seq_len={self.model.max_seq_len} tokens ({need} pages of {self.cache.page_size}): "
                f"raise cache.num_pages to at least {need} or lower model.max_seq_len"
            )
        return self

    def pages_for_one_sequence(self) -> int | None:
        if self.model.max_seq_len is None:
            return None
        return math.ceil(self.model.max_seq_len / self.cache.page_size)

    @classmethod
    def from_toml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> ServeConfig:
        """Read a TOML file, substitute `${ENV}`, apply flat `overrides` (see `override_keys`)."""
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"config file {path} does not exist: pass the path of a TOML file (see configs/)"
            ) from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from None
        return cls.from_dict(raw, source=str(path), overrides=overrides)

    @classmethod
    def from_dict(
        cls, raw: dict[str, Any], source: str = "config", overrides: dict[str, Any] | None = None
    ) -> ServeConfig:
        data = _substitute_env(raw, source, ())
        for key, value in (overrides or {}).items():
            section, field = _override_target(key)
            data.setdefault(section, {})
            if not isinstance(data[section], dict):
                raise ConfigError(f"{source}: [{section}] must be a table")
            data[section][field] = value
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(_explain(e, source)) from None


def override_keys() -> dict[str, tuple[str, str]]:
    """Flat keyword → (section, field): the engine options `LLM(...)` accepts as keywords."""
    keys: dict[str, tuple[str, str]] = {}
    for section, info in ServeConfig.model_fields.items():
        sub = info.annotation
        for field in sub.model_fields:  # type: ignore[union-attr]
            keys[field if field not in keys else f"{section}_{field}"] = (section, field)
    keys["device"] = ("device", "kind")
    keys["speculative_method"] = keys.pop("method")  # LLM(speculative_method="mtp", num_draft_tokens=2)
    return keys


def _override_target(key: str) -> tuple[str, str]:
    keys = override_keys()
    if key not in keys:
        raise ConfigError(f"unknown engine option {key!r}; valid options: {', '.join(sorted(keys))}")
    return keys[key]


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _substitute_env(value: Any, source: str, where: tuple[str, ...]) -> Any:
    if isinstance(value, dict):
        return {k: _substitute_env(v, source, (*where, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute_env(v, source, where) for v in value]
    if not isinstance(value, str):
        return value

    def replace(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if default is not None and not os.environ.get(name):  # ${VAR:-x}: x when VAR is unset or empty
            return default
        if name in os.environ:
            return os.environ[name]
        raise ConfigError(
            f"{source}: {'.'.join(where)} = {value!r} needs the environment variable {name}, which is not set: "
            f"export {name}=... or write a default as ${{{name}:-value}}"
        )

    return _ENV.sub(replace, value)


def _explain(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration:"]
    for item in error.errors():
        loc = [str(p) for p in item["loc"]]
        key = ".".join(loc) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "missing":
            sub = _section_model(loc)
            if sub is not None:
                keys = ", ".join(f"{key}.{k}" for k in sorted(sub.model_fields))
                lines.append(f"  [{key}] is required and missing: add a [{key}] table; its keys: {keys}")
            else:
                lines.append(f"  {key}: required and missing ({_description(loc) or 'see configs/'})")
            continue
        if item["type"] == "extra_forbidden":
            parent = _section_model(loc[:-1])
            valid = ", ".join(sorted(parent.model_fields)) if parent else ""
            lines.append(f"  {key}: unknown key; valid keys here: {valid}")
            continue
        hint = _description(loc)
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f" = {value!r}"
        lines.append(f"  {key}{shown}: {message}" + (f" ({key}: {hint})" if hint else ""))
    return "\n".join(lines)


def _section_model(loc: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] = ServeConfig
    for part in loc:
        info = model.model_fields.get(part)
        if info is None:
            return None
        nested = [
            a for a in _annotation_args(info.annotation) if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if not nested:
            return None
        model = nested[0]
    return model


def _description(loc: list[str]) -> str | None:
    parent = _section_model(loc[:-1])
    if parent is None or not loc:
        return None
    info = parent.model_fields.get(loc[-1])
    return info.description if info else None


def _annotation_args(annotation: Any) -> list[Any]:
    args = list(getattr(annotation, "__args__", ()) or ())
    return args or [annotation]
