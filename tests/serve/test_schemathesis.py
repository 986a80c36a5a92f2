"""Schemathesis over the dev server's /openapi.json: requests generated from the documented bodies
(valid and broken ones), a bounded number per operation. Every response must be no server error
(no 5xx), have a documented status and content type, and match its documented schema.

Generated generations are kept short (n, max_tokens and prompt lists capped by a hook), so the
run takes a couple of minutes on the CPU; the bodies are otherwise what schemathesis makes of the
schema."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import checks  # noqa: E402
from schemathesis.specs.openapi import checks as openapi_checks  # noqa: E402

pytestmark = pytest.mark.slow

EXAMPLES_PER_OPERATION = 25
CHECKS = [
    checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_headers_conformance,
    openapi_checks.response_schema_conformance,
]


@schemathesis.hook
def map_body(context, body):  # type: ignore[no-untyped-def]
    """Short generations: a valid request decodes at most a few tokens for at most a few samples."""
    if isinstance(body, dict):
        for key, cap in (("n", 2), ("max_tokens", 4), ("max_completion_tokens", 4)):
            if isinstance(body.get(key), int) and not isinstance(body[key], bool) and body[key] > cap:
                body[key] = cap
        if "max_tokens" not in body and "max_completion_tokens" not in body and "messages" in body:
            body["max_tokens"] = 4
        if isinstance(body.get("prompt"), list) and len(body["prompt"]) > 4:
            body["prompt"] = body["prompt"][:4]
    return body


def test_the_api_conforms_to_its_openapi_document(dev_server) -> None:
    schema = schemathesis.openapi.from_url(f"{dev_server.url}/openapi.json")
    headers = {"Authorization": f"Bearer {dev_server.api_key}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {
        "POST /v1/completions",
        "POST /v1/chat/completions",
        "GET /health",
    }
    statuses: list[int] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def conforms(case) -> None:  # type: ignore[no-untyped-def]
            response = case.call_and_validate(base_url=dev_server.url, headers=headers, checks=CHECKS)
            statuses.append(response.status_code)

        conforms()
    # it did run: every operation got its examples, and both accepted and refused bodies came back
    assert len(statuses) >= len(operations) * 5 and 200 in statuses and 400 in statuses, sorted(set(statuses))
