"""The OpenAPI document of the HTTP API: every request body and every response body.

The routes read their bodies themselves (size limits and JSON depth come before validation), so
FastAPI cannot see the models: this module puts them into the document by hand, from the same
pydantic models that validate the requests and describe the responses.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from nmoe_serve.serve.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    HealthResponse,
    ModelList,
    PrefixCacheReset,
)

ERRORS = {
    "400": "the request is malformed or cannot fit the model's context",
    "401": "no API key, or a wrong one",
    "403": "an admin route, and the server has no API key configured",
    "404": "no such model or path",
    "405": "the path takes another method",
    "413": "the body is larger than the server accepts",
    "415": "the body is not application/json",
    "429": "the EP group's queue is full: retry after Retry-After seconds",
    "500": "the engine failed while running the request: retry it",
    "503": "the server is at capacity or starting: retry after Retry-After seconds",
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _errors(*codes: str) -> dict[str, Any]:
    out = {}
    for code in codes:
        response = _json(ErrorResponse, ERRORS[code])
        if code in ("429", "503"):
            response["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
        out[code] = response
    return out


def _generation(request: type[BaseModel], whole: type[BaseModel], chunk: type[BaseModel]) -> dict[str, Any]:
    stream = (
        f"with stream: true, server-sent events: `data: <{chunk.__name__}>` lines, then `data: [DONE]`; "
        "an error during the stream comes as one `data: <ErrorResponse>` event before [DONE]"
    )
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
        "responses": {
            "200": {
                "description": f"{whole.__name__}, or {stream}",
                "content": {
                    "application/json": {"schema": _ref(whole)},
                    "text/event-stream": {"schema": {"type": "string", "description": stream}},
                },
            },
            **_errors("400", "401", "404", "413", "415", "429", "500", "503"),
        },
    }


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """The document, built once and kept in app.openapi_schema."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version="1", description=app.description, routes=app.routes)
    models = [
        (CompletionRequest, "validation"),
        (ChatCompletionRequest, "validation"),
        (CompletionResponse, "serialization"),
        (ChatCompletionResponse, "serialization"),
        (CompletionChunk, "serialization"),
        (ChatCompletionChunk, "serialization"),
        (ErrorResponse, "serialization"),
        (HealthResponse, "serialization"),
        (ModelList, "serialization"),
        (PrefixCacheReset, "serialization"),
    ]
    _, schemas = models_json_schema(models, ref_template="#/components/schemas/{model}")  # type: ignore[arg-type]
    doc.setdefault("components", {})["schemas"] = schemas.get("$defs", {})
    paths = doc["paths"]
    paths["/v1/completions"]["post"].update(
        _generation(CompletionRequest, CompletionResponse, CompletionChunk)
    )
    paths["/v1/chat/completions"]["post"].update(
        _generation(ChatCompletionRequest, ChatCompletionResponse, ChatCompletionChunk)
    )
    paths["/v1/models"]["get"]["responses"] = {"200": _json(ModelList, "the served model"), **_errors("401")}
    paths["/reset_prefix_cache"]["post"]["responses"] = {
        "200": _json(PrefixCacheReset, "every EP group's prefix cache is empty"),
        **_errors("401", "403", "500", "503"),
    }
    paths["/health"]["get"]["responses"] = {
        "200": _json(HealthResponse, "serving"),
        "503": _json(HealthResponse, "starting, or the engine is not answering")
        | {"headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}},
    }
    app.openapi_schema = doc
    return doc
