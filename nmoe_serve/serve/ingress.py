"""The HTTP ingress: OpenAI-compatible completions and chat completions, streamed as SSE or whole.

HTTP only: authentication, admission and limits, parsing, streaming, and the mapping of errors to
statuses. What a request means (validation, tokenization, the fan-out into engine requests,
detokenization and stop strings, OpenAI's shapes) is the front end's (nmoe_serve.frontend), the
same code the offline API runs. Each engine request streams from the EP group's coordinator
through a Serve handle.

A request is checked from cheapest to dearest, and refused at the first check it fails: the body
size and content type, JSON nesting, the strict request model, the model name, the number of
engine requests it asks for (prompts × n), admission (a bounded count of engine requests in
flight in this replica: past it, 503 with Retry-After, before any tokenizing), the text's bytes
against what the context can hold, then tokenization, off the event loop. Errors go out as
{"error": {message, type, param, code}} with the right status: 400 bad request or too long, 401
API key, 404 model or path, 405 method, 413 body, 415 content type, 429 the group's queue full,
503 at capacity or starting (both with Retry-After), 500 an engine fault (retry). A client sees
what happened and its own request id; causes, addresses and other requests go to the log only.
A client that goes away cancels its engine requests, which frees their pages.

No `from __future__ import annotations` here: Serve's class-based FastAPI views read the route
signatures at runtime, and string annotations would turn `request: Request` into a query field.
Module-level helpers stand above the class: serve.ingress copies the class when it is defined.
"""

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from nmoe_serve.config import ServerSection
from nmoe_serve.engine.coordinator import RequestFailed
from nmoe_serve.engine.request import RequestRejected
from nmoe_serve.engine.scheduler import TokenUpdate
from nmoe_serve.frontend.frontend import Frontend
from nmoe_serve.frontend.generation import Completion, Generation
from nmoe_serve.frontend.openai import OpenAIShapes
from nmoe_serve.frontend.validation import InvalidRequest
from nmoe_serve.serve.openapi import openapi_document
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

MAX_JSON_DEPTH = 32  # the request models nest 4 deep
HEALTH_POLL_S = 1.0  # how often the ingress asks its coordinator whether it serves
HEALTH_STALE_S = 15.0  # no answer for this long after serving: /health reads "unavailable"
REFUSALS_PER_ADMITTED = 8  # requests taken at once to refuse, per admitted one

# (engine id, this step's updates | the error that ended the stream | None at its end)
StreamItem = tuple[str, list[TokenUpdate] | BaseException | None]


def api_error(error: BaseException, retry_after_s: int, request_id: str | None = None) -> APIError:
    """Map an exception from the front end or the engine to the HTTP error the client gets."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(error, APIError):
        return error
    if isinstance(error, InvalidRequest):
        return APIError(400, str(error), param=error.param, code=error.code)
    if isinstance(error, RequestRejected):
        return APIError(400, str(error).splitlines()[-1], code="context_length_exceeded")
    if isinstance(error, Overloaded):
        return APIError(
            429, f"the server is busy ({error}); retry later", "rate_limit_error", code="overloaded",
            retry_after_s=retry_after_s,
        )  # fmt: skip
    if isinstance(error, BackPressureError | RayActorError | DeploymentUnavailableError):
        log.warning("request %s: the engine is not available: %r", request_id, error)
        return APIError(
            503, "the engine is at capacity or restarting; retry later", "service_unavailable",
            retry_after_s=retry_after_s,
        )  # fmt: skip
    which = f"request {request_id}" if request_id else "the request"
    if isinstance(error, RequestFailed):
        return APIError(
            500, f"the engine failed while running {which} and has restarted: retry the request",
            "server_error", code="engine_error",
        )  # fmt: skip
    log.error("%s: unexpected error: %r", which, error)
    return APIError(500, f"internal error while running {which}: retry the request", "server_error")


def error_response(error: APIError) -> Response:
    headers = {"Retry-After": str(error.retry_after_s)} if error.retry_after_s else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


@app.exception_handler(StarletteHTTPException)
async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """Unknown paths and wrong methods, in OpenAI's error shape."""
    if exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    elif exc.status_code == 404:
        message = f"no route {request.url.path}: see /openapi.json for the API"
    else:
        message = str(exc.detail)
    return error_response(APIError(exc.status_code, message, code="invalid_request"))


app.openapi = lambda: openapi_document(app)  # type: ignore[method-assign]


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def chain(first: Any, rest: Any) -> AsyncGenerator[Any, None]:
    """`first`, then the items of the async generator `rest`, which is closed however this ends."""
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()


def json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest


def inflight_bound(settings: EngineSettings, server: ServerSection) -> int:
    """Engine requests one ingress replica keeps in flight: the groups' capacity (running +
    queued), shared among the replicas, unless [server] max_inflight_sequences says otherwise."""
    if server.max_inflight_sequences is not None:
        return server.max_inflight_sequences
    capacity = server.ep_groups * (
        settings.ep_size * settings.core.max_num_seqs + server.max_waiting_requests
    )
    return max(1, capacity // server.ingress_replicas)


class Admission:
    """The engine requests one ingress replica has in flight, held below its bound: past it a
    request gets 503 with Retry-After before any expensive work."""

    def __init__(self, bound: int, retry_after_s: int) -> None:
        self.bound, self.retry_after_s, self.inflight = bound, retry_after_s, 0

    def check(self, count: int) -> None:
        """Refuse (APIError 503, code at_capacity) if `count` more would pass the bound."""
        if self.inflight + count > self.bound:
            raise APIError(
                503,
                f"the server is at capacity ({self.inflight} completions in flight); retry later",
                "service_unavailable",
                code="at_capacity",
                retry_after_s=self.retry_after_s,
            )

    def reserve(self, count: int) -> int:
        self.check(count)
        self.inflight += count
        return count

    def release(self, count: int) -> None:
        self.inflight -= count


def serve_request_id() -> str:
    """Serve's id of the HTTP request (its access log line carries it), else a fresh one."""
    try:
        rid = serve.context._get_serve_request_context().request_id
    except AttributeError:  # Serve changed its private context: fall back to our own ids
        rid = ""
    return rid or uuid.uuid4().hex


@serve.ingress(app)
class Ingress:
    """The FastAPI ingress; app.py deploys it with `deployment_options`."""

    @staticmethod
    def deployment_options(settings: EngineSettings, server: ServerSection) -> dict[str, Any]:
        # The replica takes its admitted completions plus up to 8 times as many requests that it
        # refuses at once (503 in OpenAI's shape, before reading their bodies); beyond that they wait
        # in Serve's queue, unbounded, because Serve's own refusals would be plain text. Its health
        # check gets 120 s: under a flood on few cores the replica's loop runs late but runs.
        return {
            "name": "Ingress",
            "num_replicas": server.ingress_replicas,
            "ray_actor_options": {"num_cpus": 0.5},
            "max_ongoing_requests": (1 + REFUSALS_PER_ADMITTED) * inflight_bound(settings, server),
            "health_check_period_s": 10,
            "health_check_timeout_s": 120,
        }

    def __init__(self, coordinator: Any, settings: EngineSettings, server: ServerSection) -> None:
        from nmoe_serve.serve.metrics import FrontendMetrics

        self.coordinator, self.server = coordinator, server
        self.frontend = Frontend(settings)
        self.model_name = settings.model_name
        self.api_key = server.api_key or None
        self.metrics = FrontendMetrics(self.model_name)
        self.shapes = {chat: OpenAIShapes(self.model_name, chat) for chat in (False, True)}
        self.admission = Admission(inflight_bound(settings, server), server.retry_after_s)
        self.created = int(time.time())
        self.state = "starting"
        self.last_answer = 0.0
        self._poller: asyncio.Task[None] | None = None

    # ---- routes --------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> Response:
        """Answers at once from the state the poller keeps: starting, ok, unavailable."""
        self._ensure_poller()
        if self.state == "ok" and time.monotonic() - self.last_answer > HEALTH_STALE_S:
            self.state = "unavailable"
        if self.state == "ok":
            return JSONResponse({"status": "ok"})
        retry = str(max(self.server.retry_after_s, 5))
        return JSONResponse({"status": self.state}, status_code=503, headers={"Retry-After": retry})

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

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache(self, request: Request) -> Response:
        """Admin: forget the prefix cache of every EP group (running requests keep their pages).
        Needs the API key; with none configured the route is refused."""
        if self.api_key is None:
            return self._fail(
                APIError(
                    403,
                    "admin routes need an API key: set [server] api_key and send 'Authorization: Bearer <key>'",
                    "permission_error",
                )
            )
        if (denied := self._check_auth(request)) is not None:
            return denied
        try:
            answers = await asyncio.gather(
                *(self.coordinator.reset_prefix_cache.remote(i) for i in range(self.server.ep_groups))
            )
        except Exception as e:
            log.error("prefix cache reset failed: %r", e)
            return self._fail(api_error(e, self.server.retry_after_s))
        groups = {a["group"]: a["dropped_pages"] for a in answers}
        if len(groups) < self.server.ep_groups:  # a group still starting or restarting was not reached
            return self._fail(
                APIError(
                    503,
                    f"only {len(groups)} of {self.server.ep_groups} EP groups are serving; their caches were "
                    "reset: retry once every group serves",
                    "service_unavailable",
                    retry_after_s=self.server.retry_after_s,
                )
            )
        return JSONResponse({"groups": groups, "dropped_pages": sum(groups.values())})

    async def check_health(self) -> None:
        """Serve's health check of this replica: its own loop only, never the engine."""
        self._ensure_poller()

    # ---- one request ----------------------------------------------------------------------------

    async def _handle(self, request: Request, model: Any, chat: bool) -> Response:
        started = time.monotonic()
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{serve_request_id()}"
        reserved = 0
        try:
            if (denied := self._check_auth(request)) is not None:
                return denied
            self.admission.check(1)  # at capacity: refused before the body is even read
            body = await self._parse(request, model)
            reserved = self.admission.reserve(self._sequences(body, chat))
            generation = await self._prepare(body, chat, request_id)
            events = self._events(generation, started, reserved)
            reserved = 0  # the events own the reservation now, and release it when they end
            first = await anext(events)  # admission errors surface here, before any header is sent
        except (APIError, InvalidRequest, RequestRejected) as e:
            return self._fail(api_error(e, self.server.retry_after_s, request_id))
        finally:
            self.admission.release(reserved)
        headers = {"X-Request-Id": generation.request_id}
        if body.stream:
            return StreamingResponse(
                self._sse(generation, body.include_usage, self.shapes[chat], chain(first, events), started),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", **headers},
            )
        try:
            async for _ in events:
                pass
        except APIError as e:
            return self._fail(e)
        finally:
            await events.aclose()  # the client gone: cancel the engine requests now
        self.metrics.e2e.observe(time.monotonic() - started)
        return JSONResponse(self.shapes[chat].response(generation), headers=headers)

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
        """The validated body: size, content type, JSON, nesting, the strict model, the model name."""
        limit = self.server.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(
                413,
                f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                code="request_too_large",
            )
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise APIError(
                415,
                f"the body must be JSON sent with 'Content-Type: application/json', not {content_type or 'none'!r}",
                code="unsupported_media_type",
            )
        raw = await request.body()
        if len(raw) > limit:
            raise APIError(
                413,
                f"request body of {len(raw)} bytes exceeds the limit of {limit} bytes",
                code="request_too_large",
            )
        too_deep = APIError(
            400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels of arrays and objects"
        )
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise too_deep from None
        if isinstance(data, dict | list) and json_depth(data) > MAX_JSON_DEPTH:
            raise too_deep
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

    def _sequences(self, body: Any, chat: bool) -> int:
        """The engine requests a body asks for (prompts × n), refused above the configured bound."""
        count = body.n * (1 if chat else len(body.prompts()))
        bound = self.server.max_sequences_per_request
        if count > bound:
            what = "n" if chat else f"{len(body.prompts())} prompts × n = {body.n}"
            raise APIError(
                400,
                f"the request asks for {count} completions ({what}); this server takes at most {bound} per "
                "request: send fewer prompts or a smaller n",
                param="n" if chat or len(body.prompts()) == 1 else "prompt",
            )
        return count

    async def _prepare(self, body: Any, chat: bool, request_id: str) -> Generation:
        """Tokenize (in a thread: a long text must not stall other streams) and fan out."""
        frontend = self.frontend
        if chat:
            messages = body.template_messages()
            frontend.check_text_fits(["".join(m["content"] for m in messages)], "messages")
            prompts = [await asyncio.to_thread(frontend.chat_prompt, messages, body.add_generation_prompt)]
            max_tokens = body.requested_max_tokens
            max_tokens = self.server.default_max_tokens if max_tokens is None else max_tokens
            logprobs = body.requested_logprobs
        else:
            texts = [p for p in body.prompts() if isinstance(p, str)]
            frontend.check_text_fits(texts, "prompt")
            encoded = iter(await asyncio.to_thread(lambda: [frontend.encode(t) for t in texts]))
            prompts = [next(encoded) if isinstance(p, str) else p for p in body.prompts()]
            max_tokens, logprobs = body.max_tokens, body.logprobs
        try:
            sampling = body.sampling_params(max_tokens, logprobs)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return frontend.generation(request_id, prompts, sampling)

    # ---- streaming from the engine ----------------------------------------------------------------

    async def _events(
        self, generation: Generation, started: float, reserved: int
    ) -> AsyncGenerator[list[Completion], None]:
        """Yield the completions that changed, until all have finished. The first yield comes once
        every engine request was admitted (or raises APIError if one was refused). Releases the
        request's admission when it ends, however it ends."""
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
                    raise api_error(item, self.server.retry_after_s, generation.request_id)
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
            self.admission.release(reserved)

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
        events: AsyncGenerator[list[Completion], None],
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
        finally:
            await events.aclose()  # a client gone mid-stream: cancel its engine requests now
        yield "data: [DONE]\n\n"

    def _fail(self, error: APIError) -> Response:
        self.metrics.error(error.status)
        return error_response(error)

    # ---- health -----------------------------------------------------------------------------------

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name="nmoe-health")

    async def _poll(self) -> None:
        """Ask the coordinator every HEALTH_POLL_S whether it serves; /health reads the answer."""
        while True:
            try:
                await asyncio.wait_for(self.coordinator.stats.remote(), timeout=5 * HEALTH_POLL_S)
                self.state, self.last_answer = "ok", time.monotonic()
            except Exception as e:  # starting, restarting or gone: /health says which from the state
                log.debug("health poll: the coordinator did not answer: %r", e)
            await asyncio.sleep(HEALTH_POLL_S)
