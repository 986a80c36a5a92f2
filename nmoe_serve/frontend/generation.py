"""One API request in flight: its fan-out into engine requests and the shaping of their outputs.

A request has P prompts and asks for n samples of each: P × n engine requests, one Completion
each, with choice index p·n + j and engine id "<request id>-<p>-<j>". Sample j of a seeded
request uses seed + j, so the n samples differ and each is reproducible. Per completion the
front end keeps an incremental detokenizer and checks stop strings; a completion whose text
reaches a stop string is cut there and its engine request must be aborted by the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from nmoe_serve.engine.request import FinishReason
from nmoe_serve.engine.scheduler import TokenUpdate
from nmoe_serve.frontend.outputs import CompletionOutput, Logprob, RequestOutput
from nmoe_serve.sampling.params import SamplingParams
from nmoe_serve.tokenizer import IncrementalDetokenizer, Tokenizer


def sample_sampling(params: SamplingParams, sample: int) -> SamplingParams:
    """The SamplingParams of sample `sample` of a request with n samples: n = 1, seed + sample."""
    one = params.with_n(1)
    return one if one.seed is None or sample == 0 else one.with_seed((one.seed + sample) % 2**63)


@dataclass
class Completion:
    """One engine request (a prompt × a sample) and its output so far."""

    index: int  # choice index
    engine_id: str
    prompt_index: int
    prompt_token_ids: list[int]
    sampling: SamplingParams  # n = 1, this sample's seed
    output: CompletionOutput
    detokenizer: IncrementalDetokenizer | None
    sent_text: int = 0  # characters of output.text already streamed
    sent_tokens: int = 0  # tokens already streamed
    last_token_at: float = 0.0
    num_cached_tokens: int | None = None  # prompt tokens the engine found in its prefix cache


@dataclass
class Generation:
    """The completions of one request and the tokenizer that turns their tokens into text."""

    request_id: str
    prompts: list[list[int]]
    prompt_texts: list[str | None]
    sampling: SamplingParams  # as asked, with its n
    tokenizer: Tokenizer | None
    completions: list[Completion] = field(default_factory=list)

    @classmethod
    def fan_out(
        cls,
        request_id: str,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams,
        tokenizer: Tokenizer | None,
        prompt_texts: Sequence[str | None] | None = None,
    ) -> Generation:
        generation = cls(
            request_id,
            [list(p) for p in prompts],
            list(prompt_texts or [None] * len(prompts)),
            sampling,
            tokenizer,
        )
        n = sampling.n
        for p, ids in enumerate(generation.prompts):
            for j in range(n):
                detokenizer = (
                    IncrementalDetokenizer(tokenizer, ids, sampling.skip_special_tokens)
                    if tokenizer
                    else None
                )
                output = CompletionOutput(
                    index=p * n + j, logprobs=[] if sampling.logprobs is not None else None
                )
                generation.completions.append(
                    Completion(
                        p * n + j,
                        f"{request_id}-{p}-{j}",
                        p,
                        ids,
                        sample_sampling(sampling, j),
                        output,
                        detokenizer,
                    )
                )
        return generation

    @property
    def finished(self) -> bool:
        return all(c.output.finished for c in self.completions)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens served from the prefix cache: per prompt (counted once, as in
        prompt_tokens), those of its first sample."""
        n = self.sampling.n
        return sum(self.completions[p * n].num_cached_tokens or 0 for p in range(len(self.prompts)))

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.output.token_ids) for c in self.completions)

    def outputs(self) -> list[RequestOutput]:
        """One RequestOutput per prompt, its n completions in order."""
        n = self.sampling.n
        return [
            RequestOutput(
                f"{self.request_id}-{p}" if len(self.prompts) > 1 else self.request_id,
                self.prompt_texts[p],
                ids,
                [c.output for c in self.completions[p * n : (p + 1) * n]],
                self.completions[p * n].num_cached_tokens,
            )
            for p, ids in enumerate(self.prompts)
        ]

    def apply(self, completion: Completion, updates: list[TokenUpdate]) -> bool:
        """Apply one completion's updates; True if its text reached a stop string (the caller
        must then abort its engine request: the engine does not know it ended)."""
        for update in updates:
            if completion.output.finished:
                break
            if self._apply_one(completion, update):
                return True
        return False

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False) if self.tokenizer else str(token)

    def _apply_one(self, completion: Completion, update: TokenUpdate) -> bool:
        output, sampling = completion.output, completion.sampling
        output.token_ids.append(update.token_id)
        if update.num_cached_tokens is not None:
            completion.num_cached_tokens = update.num_cached_tokens
        if output.logprobs is not None and update.logprob is not None:
            text = self.token_text if self.tokenizer else None
            entry = {update.token_id: Logprob(update.logprob, text(update.token_id) if text else None)}
            for token, logprob in update.top_logprobs or ():
                entry.setdefault(token, Logprob(logprob, text(token) if text else None))
            output.logprobs.append(entry)
        ended_by_token = update.finish_reason is FinishReason.STOP
        if completion.detokenizer is not None and not ended_by_token:
            before = len(output.text)
            output.text += completion.detokenizer.add([update.token_id])
            if sampling.stop and _cut_at_stop_string(output, sampling, before):
                return True
        if update.finish_reason is not None:
            output.finish_reason = update.finish_reason.value
            output.stop_reason = update.stop_token_id
            if completion.detokenizer is not None and self.tokenizer is not None:
                ids = output.token_ids[:-1] if ended_by_token else output.token_ids
                output.text = self.tokenizer.decode(ids, sampling.skip_special_tokens)
        return False


def _cut_at_stop_string(output: CompletionOutput, sampling: SamplingParams, before: int) -> bool:
    longest = max(len(s) for s in sampling.stop)
    search_from = max(0, before - longest + 1)
    hits = [(output.text.find(s, search_from), s) for s in sampling.stop]
    hits = [(i, s) for i, s in hits if i >= 0]
    if not hits:
        return False
    index, stop = min(hits)
    output.text = (
        output.text[: index + len(stop)] if sampling.include_stop_str_in_output else output.text[:index]
    )
    output.finish_reason = FinishReason.STOP.value
    output.stop_reason = stop
    return True
