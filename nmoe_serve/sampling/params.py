"""SamplingParams: what a request asks of the sampler and of the stop logic.

Plain, frozen and picklable: it travels inside step plans to the worker that owns the request.
Every field is checked when the object is built; a bad value raises ValueError naming the field,
the value and the accepted range.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request.

    Attributes:
        n: number of independent completions for the prompt.
        max_tokens: most tokens to generate; None means up to the context limit.
        min_tokens: tokens to generate before EOS or stop_token_ids may end the request.
        temperature: 0 means greedy; otherwise logits are divided by it.
        top_p: keep the smallest set of tokens whose probability sums to at least top_p (1 = off).
        top_k: keep the k most likely tokens (0 or -1 = off).
        min_p: drop tokens whose probability is below min_p times the most likely one (0 = off).
        seed: per-request seed; the same seed and prompt give the same tokens.
        stop: strings that end the request; they are not part of the returned text unless
            include_stop_str_in_output is set.
        stop_token_ids: token ids that end the request (the token is returned, its text is not).
        ignore_eos: keep generating past the end-of-sequence token.
        presence_penalty: subtracted from the logit of every token already generated.
        frequency_penalty: subtracted once per earlier occurrence in the generated tokens.
        repetition_penalty: divides positive (multiplies negative) logits of tokens seen in the
            prompt or the output (1 = off).
        logprobs: return the sampled token's log-probability and this many top alternatives
            (None = no logprobs). Log-probabilities are of the model's distribution before
            penalties, temperature and truncation.
        skip_special_tokens: leave special tokens out of the returned text.
        include_stop_str_in_output: keep the matched stop string at the end of the text.
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    stop_token_ids: tuple[int, ...] = field(default=())
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        # Accept lists (and a single string for stop) from callers; store tuples.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.stop_token_ids, tuple):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self._check()

    def _check(self) -> None:
        def bad(name: str, value: object, want: str) -> ValueError:
            return ValueError(f"SamplingParams.{name}={value!r} is invalid: {want}")

        if not _is_int(self.n) or self.n < 1:
            raise bad("n", self.n, "it must be an integer >= 1")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", self.max_tokens, "it must be an integer >= 1, or None for no limit")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", self.min_tokens, "it must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", self.min_tokens, f"it must not exceed max_tokens={self.max_tokens}")
        if not _is_finite(self.temperature) or self.temperature < 0:
            raise bad("temperature", self.temperature, "it must be a finite number >= 0 (0 = greedy)")
        if not _is_finite(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", self.top_p, "it must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", self.top_k, "it must be an integer >= 1, or 0 / -1 to turn it off")
        if not _is_finite(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", self.min_p, "it must be in [0, 1]")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise bad("seed", self.seed, "it must be an integer in [0, 2**63)")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise bad("stop", self.stop, "every stop string must be a non-empty string")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise bad("stop_token_ids", self.stop_token_ids, "every id must be an integer >= 0")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_finite(value) or not -2 <= value <= 2:
                raise bad(name, value, "it must be in [-2, 2]")
        if not _is_finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", self.repetition_penalty, "it must be > 0 (1 = off)")
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise bad("logprobs", self.logprobs, f"it must be an integer in [0, {MAX_LOGPROBS}], or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def with_seed(self, seed: int | None) -> SamplingParams:
        return dataclasses.replace(self, seed=seed)

    def with_n(self, n: int) -> SamplingParams:
        return dataclasses.replace(self, n=n)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
