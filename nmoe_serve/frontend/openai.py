"""OpenAI's response shapes for completions and chat completions: whole responses, stream chunks
(deltas that hold back a possible stop string's prefix), usage and logprobs."""

from __future__ import annotations

import time
from typing import Any

from nmoe_serve.frontend.generation import Completion, Generation
from nmoe_serve.frontend.outputs import Logprob


class OpenAIShapes:
    """Builds the JSON bodies of one endpoint (chat or completions) of one served model."""

    def __init__(self, model_name: str, chat: bool) -> None:
        self.model_name, self.chat = model_name, chat
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"

    def chunk(
        self, generation: Generation, index: int | None, payload: dict[str, Any] | None
    ) -> dict[str, Any]:
        """A stream chunk; no choices (the usage chunk) when index is None."""
        body: dict[str, Any] = {
            "id": generation.request_id,
            "object": self.chunk_object,
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [],
        }
        if payload is not None:
            body["choices"] = [{"index": index, **payload}]
        return body

    def role_chunks(self, generation: Generation) -> list[dict[str, Any]]:
        """Chat streams open each choice with the assistant role; completions streams do not."""
        if not self.chat:
            return []
        opening = {"delta": {"role": "assistant", "content": ""}}
        return [self.chunk(generation, c.index, opening) for c in generation.completions]

    def delta(self, generation: Generation, completion: Completion) -> dict[str, Any] | None:
        """The chunk carrying what `completion` gained since the last one (None if nothing to send).

        While a stop string may still match, its longest possible prefix is held back."""
        out = completion.output
        stops = generation.sampling.stop
        hold = 0 if out.finished or not stops else max(len(s) for s in stops) - 1
        end = max(completion.sent_text, len(out.text) - hold)
        text = out.text[completion.sent_text : end]
        new_tokens = len(out.token_ids) - completion.sent_tokens
        if not text and not out.finished and not (out.logprobs and new_tokens):
            return None
        logprobs = None
        if out.logprobs is not None:
            logprobs = self.logprobs(
                generation,
                out.token_ids[completion.sent_tokens :],
                out.logprobs[completion.sent_tokens :],
                completion.sent_text,
            )
        completion.sent_text, completion.sent_tokens = end, len(out.token_ids)
        payload: dict[str, Any]
        if self.chat:
            payload = {"delta": {"content": text} if text else {}, "logprobs": logprobs}
        else:
            payload = {"text": text, "logprobs": logprobs}
        payload["finish_reason"] = out.finish_reason if out.finished else None
        if out.finished:
            payload["stop_reason"] = out.stop_reason
        return self.chunk(generation, completion.index, payload)

    def usage_chunk(self, generation: Generation) -> dict[str, Any]:
        body = self.chunk(generation, None, None)
        body["usage"] = usage(generation)
        return body

    def response(self, generation: Generation) -> dict[str, Any]:
        """The whole (non-streamed) response."""
        choices = []
        for completion in generation.completions:
            out = completion.output
            logprobs = (
                None if out.logprobs is None else self.logprobs(generation, out.token_ids, out.logprobs, 0)
            )
            entry: dict[str, Any] = {
                "index": completion.index,
                "finish_reason": out.finish_reason,
                "stop_reason": out.stop_reason,
                "logprobs": logprobs,
            }
            if self.chat:
                entry["message"] = {"role": "assistant", "content": out.text}
            else:
                entry["text"] = out.text
            choices.append(entry)
        return {
            "id": generation.request_id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": usage(generation),
        }

    def logprobs(
        self, generation: Generation, tokens: list[int], entries: list[dict[int, Logprob]], offset: int
    ) -> dict[str, Any]:
        """Chat's {"content": [...]} or completions' {"tokens", "token_logprobs", ...}; `offset` is
        the text position of the first token (completions' text_offset)."""
        text, top_k = generation.token_text, generation.sampling.logprobs or 0
        if self.chat:
            content = []
            for token, entry in zip(tokens, entries, strict=False):
                top = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:top_k]
                content.append(
                    {
                        "token": text(token),
                        "logprob": entry[token].logprob,
                        "bytes": list(text(token).encode()),
                        "top_logprobs": [
                            {"token": text(t), "logprob": lp.logprob, "bytes": list(text(t).encode())}
                            for t, lp in top
                        ],
                    }
                )
            return {"content": content}
        strings, offsets, position = [], [], offset
        for token in tokens:
            strings.append(text(token))
            offsets.append(position)
            position += len(strings[-1])
        return {
            "tokens": strings,
            "token_logprobs": [entry[token].logprob for token, entry in zip(tokens, entries, strict=False)],
            "top_logprobs": [{text(t): lp.logprob for t, lp in entry.items()} for entry in entries],
            "text_offset": offsets,
        }


def usage(generation: Generation) -> dict[str, Any]:
    prompt, completion = generation.prompt_tokens, generation.completion_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": generation.cached_tokens},
    }
