"""The HTTP ingress: OpenAI-compatible completions and chat completions, streamed as SSE or whole.

The ingress validates, tokenizes (chat template included), fans a request out into one engine
request per prompt and sample, streams each from its EP group's coordinator, detokenizes, cuts
stop strings, and answers in OpenAI's shapes. Errors go out as {"error": {message, type, param,
code}} with the right status: 400 bad request or too long, 401 API key, 404 model, 413 body,
429/503 overloaded (with Retry-After), 500 engine faults. A client that goes away cancels its
engine requests, which frees their pages.

No `from __future__ import annotations` here: Serve's class-based FastAPI views read the route
signatures at runtime, and string annotations would turn `request: Request` into a query field.
Module-level helpers stand above the class: serve.ingress copies the class when it is defined.
"""

import asyncio
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve

from nmoe_serve.config import ServeConfig
from nmoe_serve.coordinator import RequestFailed
from nmoe_serve.engine.output_processor import OutputProcessor, child_sampling
from nmoe_serve.engine.outputs import CompletionOutput, Logprob
from nmoe_serve.engine.scheduler import RequestRejected, TokenUpdate
from nmoe_serve.engine.settings import resolve_settings
from nmoe_serve.sampling.params import SamplingParams
from nmoe_serve.serve.coordinator_deployment import Overloaded
from nmoe_serve.serve.metrics import FrontendMetrics
from nmoe_serve.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, validation_message
from nmoe_serve.tokenizer import Tokenizer

log = logging.getLogger(__name__)

app = FastAPI(title="nmoe_serve", description="OpenAI-compatible API for DeepSeek-V3-family models")


@dataclass
class _Choice:
    """One engine request (a prompt × a sample) and what has been sent of it so far."""

    index: int
    engine_id: str
    prompt_index: int
    output: CompletionOutput
    sent_text: int = 0
    sent_tokens: int = 0
    last_token_at: float = 0.0


@dataclass
class _Generation:
    request_id: str
    prompts: list[list[int]]
    sampling: SamplingParams
    choices: list[_Choice] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.output.token_ids) for c in self.choices)


def _api_error(error: BaseException, retry_after_s: int) -> APIError:
    """Map an engine-side exception to the HTTP error the client gets."""
    from ray.serve.exceptions import BackPressureError

    if isinstance(error, APIError):
        return error
    if isinstance(error, RequestRejected):
        return APIError(
            400,
            str(error).split("\n")[-1] if "\n" in str(error) else str(error),
            code="context_length_exceeded",
        )
    if isinstance(error, Overloaded):
        return APIError(
            429,
            f"the server is busy ({error}); retry later",
            "rate_limit_error",
            code="overloaded",
            retry_after_s=retry_after_s,
        )
    if isinstance(error, BackPressureError):
        return APIError(
            503, "the server is at capacity; retry later", "service_unavailable", retry_after_s=retry_after_s
        )
    if isinstance(error, RequestFailed):
        return APIError(
            500, f"{error}; the engine restarted, retry the request", "server_error", code="engine_error"
        )
    log.error("unexpected error in a request: %r", error)
    return APIError(500, f"internal error: {type(error).__name__}", "server_error")


async def _chain(first: Any, rest: AsyncIterator) -> AsyncIterator:
    yield first
    async for item in rest:
        yield item


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _error(error: APIError) -> Response:
    headers = {"Retry-After": str(error.retry_after_s)} if error.retry_after_s else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


@serve.ingress(app)
class Ingress:
    """The FastAPI ingress; serve.deployment in app.py sets its options."""

    def __init__(self, coordinator: Any, config: ServeConfig) -> None:
        self.coordinator = coordinator
        self.config = config
        self.settings = resolve_settings(config, check_device=False)
        self.model_name = self.settings.model_name
        self.max_seq_len = self.settings.max_seq_len
        self.vocab_size = self.settings.args.vocab_size
        try:
            self.tokenizer: Tokenizer | None = Tokenizer.from_pretrained(self.settings.tokenizer_path)
        except FileNotFoundError as e:
            log.warning("no tokenizer (%s): only token-id prompts will work", e)
            self.tokenizer = None
        self.api_key = config.server.api_key or None
        self.metrics = FrontendMetrics(self.model_name)
        self._ids = itertools.count()
        self._instance = uuid.uuid4().hex[:8]
        self.created = int(time.time())

    # ---- routes --------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> Response:
        try:
            await asyncio.wait_for(self.coordinator.stats.remote(), timeout=10)
        except Exception as e:
            return _error(APIError(503, f"engine not ready: {e}", "service_unavailable", retry_after_s=5))
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        if (denied := self._check_auth(request)) is not None:
            return denied
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.model_name,
                        "object": "model",
                        "created": self.created,
                        "owned_by": "nmoe_serve",
                        "max_model_len": self.max_seq_len,
                        "vocab_size": self.vocab_size,
                    }
                ],
            }
        )

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._handle(request, CompletionRequest, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._handle(request, ChatCompletionRequest, chat=True)

    # ---- request handling -----------------------------------------------------------------------

    async def _handle(self, request: Request, model: Any, chat: bool) -> Response:
        try:
            if (denied := self._check_auth(request)) is not None:
                return denied
            body = await self._parse(request, model)
            generation = self._prepare(body, chat)
            events = self._events(generation)
            first = await anext(events)  # admission errors surface here, before any header is sent
        except APIError as e:
            return self._fail(e)
        if body.stream:
            return StreamingResponse(
                self._sse(generation, body, chat, first, events),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Request-Id": generation.request_id},
            )
        try:
            async for _ in _chain(first, events):
                pass
        except APIError as e:
            return self._fail(e)
        self.metrics.e2e.observe(time.monotonic() - generation.started)
        return JSONResponse(self._full_response(generation, chat))

    def _check_auth(self, request: Request) -> Response | None:
        if self.api_key is None:
            return None
        header = request.headers.get("authorization", "")
        if header != f"Bearer {self.api_key}":
            why = "no API key was given" if not header else "the API key is not valid"
            return self._fail(
                APIError(
                    401,
                    f"{why}: send 'Authorization: Bearer <key>'",
                    "authentication_error",
                    code="invalid_api_key",
                )
            )
        return None

    async def _parse(self, request: Request, model: Any) -> Any:
        limit = self.config.server.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(
                413,
                f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                code="request_too_large",
            )
        raw = await request.body()
        if len(raw) > limit:
            raise APIError(
                413,
                f"request body of {len(raw)} bytes exceeds the limit of {limit} bytes",
                code="request_too_large",
            )
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            body = model.model_validate(data)
        except ValidationError as e:
            message, param = validation_message(e.errors())  # type: ignore[arg-type]
            raise APIError(400, message, param=param) from None
        if body.model is not None and body.model != self.model_name:
            raise APIError(
                404,
                f"the model '{body.model}' does not exist; this server serves '{self.model_name}'",
                param="model",
                code="model_not_found",
            )
        return body

    def _prepare(self, body: Any, chat: bool) -> _Generation:
        if chat:
            if self.tokenizer is None or self.tokenizer.chat_template is None:
                raise APIError(400, "this model has no chat template: use /v1/completions with a prompt")
            try:
                ids = self.tokenizer.apply_chat_template(
                    body.template_messages(), add_generation_prompt=body.add_generation_prompt, tokenize=True
                )
            except ValueError as e:
                raise APIError(400, f"the messages cannot be rendered: {e}", param="messages") from None
            prompts: list[list[int]] = [list(ids)]  # type: ignore[arg-type]
            max_tokens, logprobs = body.requested_max_tokens, body.requested_logprobs
        else:
            prompts = [self._prompt_ids(p) for p in body.prompts()]
            max_tokens, logprobs = body.max_tokens, body.logprobs
        for ids in prompts:
            if not ids:
                raise APIError(400, "the prompt is empty", param="prompt")
            room = self.max_seq_len - len(ids)
            if room < 1 or (max_tokens is not None and max_tokens > room):
                wanted = f"{len(ids)} in the prompt" + (f" + {max_tokens} to generate" if max_tokens else "")
                raise APIError(
                    400,
                    f"this model's context is {self.max_seq_len} tokens, but the request needs {wanted}: "
                    "shorten the prompt or lower max_tokens",
                    param="max_tokens" if room >= 1 else "prompt",
                    code="context_length_exceeded",
                )
        try:
            sampling = body.sampling_params(max_tokens, logprobs)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        bad_stop = [t for t in sampling.stop_token_ids if t >= self.vocab_size]
        if bad_stop:
            raise APIError(
                400,
                f"stop_token_ids {bad_stop} are outside the vocabulary ({self.vocab_size})",
                param="stop_token_ids",
            )
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{self._instance}{next(self._ids):x}"
        generation = _Generation(request_id, prompts, sampling)
        for p in range(len(prompts)):
            for j in range(sampling.n):
                generation.choices.append(
                    _Choice(
                        p * sampling.n + j,
                        f"{request_id}-{p}-{j}",
                        p,
                        CompletionOutput(
                            index=p * sampling.n + j, logprobs=[] if sampling.logprobs is not None else None
                        ),
                    )
                )
        return generation

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise APIError(
                    400, "this model has no tokenizer: send the prompt as a list of token ids", param="prompt"
                )
            return self.tokenizer.encode(prompt)
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(
                400, f"prompt token ids must be in [0, {self.vocab_size}); got {bad[:5]}", param="prompt"
            )
        return prompt

    # ---- running the engine requests -------------------------------------------------------------

    async def _events(self, generation: _Generation) -> AsyncIterator[list[_Choice]]:
        """Yield the choices that changed, until all have finished. The first yield comes once every
        engine request was admitted (or raises APIError if one was refused)."""
        processor = OutputProcessor(self.tokenizer)
        by_engine_id: dict[str, _Choice] = {}
        for choice in generation.choices:
            prompt_ids = generation.prompts[choice.prompt_index]
            sampling = child_sampling(generation.sampling, choice.index % generation.sampling.n)
            parent = processor.add(choice.engine_id, None, prompt_ids, sampling.with_n(1))
            choice.output = parent.outputs[0]
            by_engine_id[f"{choice.engine_id}-0"] = choice
        queue: asyncio.Queue[tuple[str, list[TokenUpdate] | BaseException | None]] = asyncio.Queue()
        tasks = {
            engine_id: asyncio.create_task(self._pump(engine_id, generation, choice, queue))
            for engine_id, choice in by_engine_id.items()
        }
        pending, admitted = set(tasks), False
        try:
            while pending:
                engine_id, item = await queue.get()
                if item is None:
                    pending.discard(engine_id)
                    continue
                if isinstance(item, BaseException):
                    raise _api_error(item, self.config.server.retry_after_s)
                changed = self._apply(generation, by_engine_id[engine_id], processor, item)
                if not admitted or changed:
                    admitted = True
                    yield changed
                if by_engine_id[engine_id].output.finished and item[-1].finish_reason is None:
                    pending.discard(engine_id)  # a stop string ended it: end the engine request too
                    tasks[engine_id].cancel()
        finally:
            for task in tasks.values():
                task.cancel()

    async def _pump(
        self, engine_id: str, generation: _Generation, choice: _Choice, queue: asyncio.Queue
    ) -> None:
        sampling = child_sampling(generation.sampling, choice.index % generation.sampling.n).with_n(1)
        stream = self.coordinator.options(stream=True).generate.remote(
            engine_id, generation.prompts[choice.prompt_index], sampling
        )
        try:
            async for updates in stream:
                queue.put_nowait((engine_id, updates))
            queue.put_nowait((engine_id, None))
        except asyncio.CancelledError:
            stream.cancel()
            raise
        except Exception as e:
            queue.put_nowait((engine_id, e))

    def _apply(
        self, generation: _Generation, choice: _Choice, processor: OutputProcessor, updates: list[TokenUpdate]
    ) -> list[_Choice]:
        now = time.monotonic()
        if generation.first_token_at is None:
            generation.first_token_at = now
            self.metrics.ttft.observe(now - generation.started)
        elif choice.last_token_at:
            self.metrics.itl.observe(now - choice.last_token_at)
        choice.last_token_at = now
        processor.process(updates)
        return [choice]

    # ---- responses ------------------------------------------------------------------------------

    async def _sse(
        self, generation: _Generation, body: Any, chat: bool, first: list[_Choice], events: AsyncIterator
    ) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"
        try:
            if chat:
                for choice in generation.choices:
                    yield _sse(
                        self._chunk(
                            generation, kind, choice.index, {"delta": {"role": "assistant", "content": ""}}
                        )
                    )
            async for changed in _chain(first, events):
                for choice in changed:
                    chunk = self._delta(generation, kind, choice, chat)
                    if chunk is not None:
                        yield _sse(chunk)
            if body.include_usage:
                usage = self._chunk(generation, kind, None, None)
                usage["usage"] = self._usage(generation)
                yield _sse(usage)
            self.metrics.e2e.observe(time.monotonic() - generation.started)
        except APIError as e:
            self.metrics.error(e.status)
            yield _sse(e.body())
        yield "data: [DONE]\n\n"

    def _delta(
        self, generation: _Generation, kind: str, choice: _Choice, chat: bool
    ) -> dict[str, Any] | None:
        out = choice.output
        text = out.text
        hold = (
            0
            if out.finished or not generation.sampling.stop
            else max(len(s) for s in generation.sampling.stop) - 1
        )
        end = max(choice.sent_text, len(text) - hold)
        delta_text = text[choice.sent_text : end]
        new_tokens = len(out.token_ids) - choice.sent_tokens
        if not delta_text and not out.finished and not (out.logprobs and new_tokens):
            return None
        logprobs = None
        if out.logprobs is not None:
            entries = out.logprobs[choice.sent_tokens :]
            tokens = out.token_ids[choice.sent_tokens :]
            logprobs = self._logprobs(
                tokens, entries, chat, choice.sent_text, generation.sampling.logprobs or 0
            )
        choice.sent_text, choice.sent_tokens = end, len(out.token_ids)
        payload: dict[str, Any]
        if chat:
            payload = {"delta": {"content": delta_text} if delta_text else {}, "logprobs": logprobs}
        else:
            payload = {"text": delta_text, "logprobs": logprobs}
        payload["finish_reason"] = out.finish_reason if out.finished else None
        if out.finished:
            payload["stop_reason"] = out.stop_reason
        return self._chunk(generation, kind, choice.index, payload)

    def _chunk(
        self, generation: _Generation, kind: str, index: int | None, payload: dict | None
    ) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": generation.request_id,
            "object": kind,
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [],
        }
        if payload is not None:
            chunk["choices"] = [{"index": index, **payload}]
        return chunk

    def _full_response(self, generation: _Generation, chat: bool) -> dict[str, Any]:
        choices = []
        for choice in generation.choices:
            out = choice.output
            logprobs = (
                None
                if out.logprobs is None
                else self._logprobs(out.token_ids, out.logprobs, chat, 0, generation.sampling.logprobs or 0)
            )
            entry: dict[str, Any] = {
                "index": choice.index,
                "finish_reason": out.finish_reason,
                "stop_reason": out.stop_reason,
                "logprobs": logprobs,
            }
            if chat:
                entry["message"] = {"role": "assistant", "content": out.text}
            else:
                entry["text"] = out.text
            choices.append(entry)
        return {
            "id": generation.request_id,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": self._usage(generation),
        }

    @staticmethod
    def _usage(generation: _Generation) -> dict[str, int]:
        return {
            "prompt_tokens": generation.prompt_tokens,
            "completion_tokens": generation.completion_tokens,
            "total_tokens": generation.prompt_tokens + generation.completion_tokens,
        }

    def _logprobs(
        self, tokens: list[int], entries: list[dict[int, Logprob]], chat: bool, offset: int, top_k: int
    ) -> dict:
        def text(token: int) -> str:
            return self.tokenizer.decode([token], skip_special_tokens=False) if self.tokenizer else str(token)

        if chat:
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

    def _fail(self, error: APIError) -> Response:
        self.metrics.error(error.status)
        headers = {"Retry-After": str(error.retry_after_s)} if error.retry_after_s else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)
