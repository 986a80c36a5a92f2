"""The HTTP ingress: OpenAI-compatible completions and chat completions, streamed as SSE or whole.

HTTP only: authentication, body limits and parsing, streaming, and the mapping of errors to
statuses. What a request means (validation, tokenization, the fan-out into engine requests,
detokenization and stop strings, OpenAI's shapes) is the front end's (nmoe_serve.frontend), the
same code the offline API runs. Each engine request streams from the EP group's coordinator
through a Serve handle. Errors go out as {"error": {message, type, param, code}} with the right
status: 400 bad request or too long, 401 API key, 404 model, 413 body, 429/503 overloaded (with
Retry-After), 500 engine faults. A client that goes away cancels its engine requests, which
frees their pages.

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
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve

from nmoe_serve.config import ServerSection
from nmoe_serve.engine.coordinator import RequestFailed
from nmoe_serve.engine.request import RequestRejected
from nmoe_serve.engine.scheduler import TokenUpdate
from nmoe_serve.frontend.frontend import Frontend
from nmoe_serve.frontend.generation import Completion, Generation
from nmoe_serve.frontend.openai import OpenAIShapes
from nmoe_serve.frontend.validation import InvalidRequest
from nmoe_serve.serve.metrics import FrontendMetrics
from nmoe_serve.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    Overloaded,
    validation_message,
)
from nmoe_serve.settings import EngineSettings

log = logging.getLogger(__name__)

app = FastAPI(title="nmoe_serve", description="OpenAI-compatible API for DeepSeek-V3-family models")

# (engine id, this step's updates | the error that ended the stream | None at its end)
StreamItem = tuple[str, list[TokenUpdate] | BaseException | None]


def api_error(error: BaseException, retry_after_s: int) -> APIError:
    """Map an exception from the front end or the engine to the HTTP error the client gets."""
    from ray.serve.exceptions import BackPressureError

    if isinstance(error, APIError):
        return error
    if isinstance(error, InvalidRequest):
        return APIError(400, str(error), param=error.param, code=error.code)
    if isinstance(error, RequestRejected):
        return APIError(400, str(error).splitlines()[-1], code="context_length_exceeded")
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


def error_response(error: APIError) -> Response:
    headers = {"Retry-After": str(error.retry_after_s)} if error.retry_after_s else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def chain(first: Any, rest: AsyncIterator) -> AsyncIterator:
    yield first
    async for item in rest:
        yield item


@serve.ingress(app)
class Ingress:
    """The FastAPI ingress; app.py deploys it with `deployment_options`."""

    @staticmethod
    def deployment_options(server: ServerSection) -> dict[str, Any]:
        return {
            "name": "Ingress",
            "num_replicas": server.ingress_replicas,
            "ray_actor_options": {"num_cpus": 0.5},
            "max_ongoing_requests": 10_000,
        }

    def __init__(self, coordinator: Any, settings: EngineSettings, server: ServerSection) -> None:
        self.coordinator = coordinator
        self.server = server
        self.frontend = Frontend(settings)
        self.model_name = settings.model_name
        self.api_key = server.api_key or None
        self.metrics = FrontendMetrics(self.model_name)
        self.shapes = {chat: OpenAIShapes(self.model_name, chat) for chat in (False, True)}
        self._ids = itertools.count()
        self._instance = uuid.uuid4().hex[:8]
        self.created = int(time.time())

    # ---- routes --------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> Response:
        try:
            await asyncio.wait_for(self.coordinator.stats.remote(), timeout=10)
        except Exception as e:
            return error_response(
                APIError(503, f"engine not ready: {e}", "service_unavailable", retry_after_s=5)
            )
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        if (denied := self._check_auth(request)) is not None:
            return denied
        model = {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "nmoe_serve",
            "max_model_len": self.frontend.max_seq_len,
            "vocab_size": self.frontend.vocab_size,
        }
        return JSONResponse({"object": "list", "data": [model]})

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._handle(request, CompletionRequest, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._handle(request, ChatCompletionRequest, chat=True)

    # ---- one request ----------------------------------------------------------------------------

    async def _handle(self, request: Request, model: Any, chat: bool) -> Response:
        started = time.monotonic()
        try:
            if (denied := self._check_auth(request)) is not None:
                return denied
            body = await self._parse(request, model)
            generation = self._prepare(body, chat)
            events = self._events(generation, started)
            first = await anext(events)  # admission errors surface here, before any header is sent
        except (APIError, InvalidRequest, RequestRejected) as e:
            return self._fail(api_error(e, self.server.retry_after_s))
        if body.stream:
            return StreamingResponse(
                self._sse(generation, body.include_usage, self.shapes[chat], chain(first, events), started),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Request-Id": generation.request_id},
            )
        try:
            async for _ in events:
                pass
        except APIError as e:
            return self._fail(e)
        self.metrics.e2e.observe(time.monotonic() - started)
        return JSONResponse(self.shapes[chat].response(generation))

    def _check_auth(self, request: Request) -> Response | None:
        if self.api_key is None:
            return None
        header = request.headers.get("authorization", "")
        if header == f"Bearer {self.api_key}":
            return None
        why = "no API key was given" if not header else "the API key is not valid"
        return self._fail(
            APIError(
                401,
                f"{why}: send 'Authorization: Bearer <key>'",
                "authentication_error",
                code="invalid_api_key",
            )
        )

    async def _parse(self, request: Request, model: Any) -> Any:
        limit = self.server.max_body_bytes
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

    def _prepare(self, body: Any, chat: bool) -> Generation:
        if chat:
            prompts = [self.frontend.chat_prompt(body.template_messages(), body.add_generation_prompt)]
            max_tokens, logprobs = body.requested_max_tokens, body.requested_logprobs
        else:
            prompts = [self.frontend.encode(p) if isinstance(p, str) else p for p in body.prompts()]
            max_tokens, logprobs = body.max_tokens, body.logprobs
        try:
            sampling = body.sampling_params(max_tokens, logprobs)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{self._instance}{next(self._ids):x}"
        return self.frontend.generation(request_id, prompts, sampling)

    # ---- streaming from the engine ----------------------------------------------------------------

    async def _events(self, generation: Generation, started: float) -> AsyncIterator[list[Completion]]:
        """Yield the completions that changed, until all have finished. The first yield comes once
        every engine request was admitted (or raises APIError if one was refused)."""
        by_id = {c.engine_id: c for c in generation.completions}
        queue: asyncio.Queue[StreamItem] = asyncio.Queue()
        tasks = {c.engine_id: asyncio.create_task(self._pump(c, queue)) for c in generation.completions}
        pending, admitted = set(tasks), False
        try:
            while pending:
                engine_id, item = await queue.get()
                if item is None:
                    pending.discard(engine_id)
                    continue
                if isinstance(item, BaseException):
                    raise api_error(item, self.server.retry_after_s)
                completion = by_id[engine_id]
                self._observe_latency(generation, completion, started)
                if generation.apply(completion, item):  # a stop string ended it: end the engine request too
                    pending.discard(engine_id)
                    tasks[engine_id].cancel()
                admitted = True
                yield [completion]
            if not admitted:
                yield []
        finally:
            for task in tasks.values():
                task.cancel()

    async def _pump(self, completion: Completion, queue: asyncio.Queue[StreamItem]) -> None:
        stream = self.coordinator.options(stream=True).generate.remote(
            completion.engine_id, completion.prompt_token_ids, completion.sampling
        )
        try:
            async for updates in stream:
                queue.put_nowait((completion.engine_id, updates))
            queue.put_nowait((completion.engine_id, None))
        except asyncio.CancelledError:
            stream.cancel()
            raise
        except Exception as e:
            queue.put_nowait((completion.engine_id, e))

    def _observe_latency(self, generation: Generation, completion: Completion, started: float) -> None:
        now = time.monotonic()
        if completion.last_token_at:
            self.metrics.itl.observe(now - completion.last_token_at)
        elif not any(c.last_token_at for c in generation.completions):
            self.metrics.ttft.observe(now - started)
        completion.last_token_at = now

    async def _sse(
        self,
        generation: Generation,
        include_usage: bool,
        shapes: OpenAIShapes,
        events: AsyncIterator[list[Completion]],
        started: float,
    ) -> AsyncIterator[str]:
        try:
            for opening in shapes.role_chunks(generation):
                yield sse(opening)
            async for changed in events:
                for completion in changed:
                    if (delta := shapes.delta(generation, completion)) is not None:
                        yield sse(delta)
            if include_usage:
                yield sse(shapes.usage_chunk(generation))
            self.metrics.e2e.observe(time.monotonic() - started)
        except APIError as e:
            self.metrics.error(e.status)
            yield sse(e.body())
        yield "data: [DONE]\n\n"

    def _fail(self, error: APIError) -> Response:
        self.metrics.error(error.status)
        return error_response(error)
