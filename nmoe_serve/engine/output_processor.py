"""The front end's side of generation: token updates in, text and finished outputs out.

Per completion it keeps an incremental detokenizer and checks stop strings; a completion whose
text reaches a stop string is cut there and reported so the caller can abort it in the engine.
A request with n > 1 is n engine requests ("<id>-0", "<id>-1", ...) gathered into one output.
"""

from __future__ import annotations

from dataclasses import dataclass

from nmoe_serve.engine.outputs import CompletionOutput, Logprob, RequestOutput
from nmoe_serve.engine.request import FinishReason
from nmoe_serve.engine.scheduler import TokenUpdate
from nmoe_serve.sampling.params import SamplingParams
from nmoe_serve.tokenizer import IncrementalDetokenizer, Tokenizer


def child_request_ids(request_id: str, n: int) -> list[str]:
    return [f"{request_id}-{i}" for i in range(n)]


def child_sampling(params: SamplingParams, index: int) -> SamplingParams:
    """Sample i of a seeded request with n > 1 uses seed + i, so the n samples differ."""
    return params if params.seed is None or index == 0 else params.with_seed((params.seed + index) % 2**63)


@dataclass
class _Completion:
    parent: RequestOutput
    output: CompletionOutput
    sampling: SamplingParams
    detokenizer: IncrementalDetokenizer | None


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self._completions: dict[str, _Completion] = {}

    def add(
        self, request_id: str, prompt: str | None, prompt_token_ids: list[int], sampling: SamplingParams
    ) -> RequestOutput:
        parent = RequestOutput(request_id, prompt, list(prompt_token_ids), [])
        for i, child in enumerate(child_request_ids(request_id, sampling.n)):
            output = CompletionOutput(index=i, logprobs=[] if sampling.logprobs is not None else None)
            parent.outputs.append(output)
            detok = (
                IncrementalDetokenizer(self.tokenizer, prompt_token_ids, sampling.skip_special_tokens)
                if self.tokenizer is not None
                else None
            )
            self._completions[child] = _Completion(parent, output, sampling, detok)
        return parent

    def process(self, updates: list[TokenUpdate]) -> tuple[list[RequestOutput], list[str]]:
        """Apply the updates. Returns (parents that changed, child ids stopped by a stop string)."""
        changed: dict[str, RequestOutput] = {}
        stopped: list[str] = []
        for update in updates:
            completion = self._completions.get(update.request_id)
            if completion is None or completion.output.finished:
                continue
            if self._apply(completion, update):
                stopped.append(update.request_id)
            if completion.output.finished:
                del self._completions[update.request_id]
            changed[completion.parent.request_id] = completion.parent
        return list(changed.values()), stopped

    def finish(self, request_id: str, reason: FinishReason) -> RequestOutput | None:
        """End a completion the engine ended without a token (abort, error)."""
        completion = self._completions.pop(request_id, None)
        if completion is None:
            return None
        completion.output.finish_reason = reason.value
        return completion.parent

    def _apply(self, completion: _Completion, update: TokenUpdate) -> bool:
        output, sampling = completion.output, completion.sampling
        output.token_ids.append(update.token_id)
        if output.logprobs is not None and update.logprob is not None:
            entry = {update.token_id: Logprob(update.logprob, self._token_text(update.token_id))}
            for token, logprob in update.top_logprobs or ():
                entry.setdefault(token, Logprob(logprob, self._token_text(token)))
            output.logprobs.append(entry)
        ended_by_token = update.finish_reason is FinishReason.STOP
        if completion.detokenizer is not None and not ended_by_token:
            before = len(output.text)
            output.text += completion.detokenizer.add([update.token_id])
            if sampling.stop and self._cut_at_stop_string(output, sampling, before):
                return True
        if update.finish_reason is not None:
            output.finish_reason = update.finish_reason.value
            output.stop_reason = update.stop_token_id
            if completion.detokenizer is not None and self.tokenizer is not None:
                ids = output.token_ids[:-1] if ended_by_token else output.token_ids
                output.text = self.tokenizer.decode(ids, sampling.skip_special_tokens)
        return False

    @staticmethod
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

    def _token_text(self, token: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token], skip_special_tokens=False)
