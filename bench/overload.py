"""Overload: many concurrent streams at once, at multiples of the server's capacity, on 127.0.0.1.

    python bench/overload.py --url http://127.0.0.1:8000 --capacity 4608 --multiples 1,4,8 \
        [--max-tokens 8] [--prompt-tokens 16] [--api-key KEY] [--out overload.json]

For each multiple m it opens m × capacity streaming completions at once (at most
--max-connections open at a time; the rest start as others end) (capacity: the sequences
the server holds, running plus queued, e.g. the dev server's 8 ranks × 64 + 512) and reads each
to its end. It counts how each ended: a complete 200 stream, a 429 or 503 in OpenAI's error shape
with Retry-After (load shed), an error event inside a 200 stream, any other status (a 500 is a
failure of the server), or a client-side timeout or connection error. Then it checks service is
normal right after: /health and one request, timed. Bounded by design: loopback addresses only,
at most --max-requests requests a level and --level-timeout seconds a level. Writes JSON, prints
a table and progress.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import httpx
from report import percentiles, print_table, write_json

SHED = (429, 503)


def loopback_only(url: str) -> str:
    host = urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise SystemExit(f"--url {url}: overload runs against 127.0.0.1 (or localhost) only")
    return url


async def one_stream(client: httpx.AsyncClient, body: dict, slots: asyncio.Semaphore) -> dict:
    """How one streaming request ended: kind, status, seconds, and what a shed answer carried."""
    async with slots:
        return await _one_stream(client, body)


async def _one_stream(client: httpx.AsyncClient, body: dict) -> dict:
    started = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                raw = await response.aread()
                try:
                    error = json.loads(raw)["error"]
                    shaped = set(error) == {"message", "type", "param", "code"}
                except (ValueError, KeyError, TypeError):
                    shaped = False
                return {
                    "kind": "shed" if response.status_code in SHED else "error_status",
                    "status": response.status_code,
                    "openai_shape": shaped,
                    "retry_after": "retry-after" in response.headers,
                    "seconds": time.perf_counter() - started,
                }
            first, done, error_event = None, False, False
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    if "error" in json.loads(line[6:]):
                        error_event = True
                    elif first is None:
                        first = time.perf_counter() - started
            kind = "error_event" if error_event else "ok" if done else "truncated"
            return {"kind": kind, "status": 200, "ttft": first, "seconds": time.perf_counter() - started}
    except (httpx.TimeoutException, httpx.TransportError) as e:
        return {"kind": "client_error", "status": None, "error": type(e).__name__,
                "seconds": time.perf_counter() - started}  # fmt: skip


async def level(args: argparse.Namespace, multiple: float, model: str, vocab: int) -> dict:
    count = min(int(multiple * args.capacity), args.max_requests)
    rng = random.Random(count)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = httpx.Timeout(args.level_timeout, connect=args.level_timeout)
    started = time.perf_counter()
    async with httpx.AsyncClient(
        base_url=args.url, limits=limits, timeout=timeout, headers=headers
    ) as client:
        bodies = [
            {
                "model": model,
                "prompt": [rng.randrange(1, vocab) for _ in range(args.prompt_tokens)],
                "max_tokens": args.max_tokens,
                "ignore_eos": True,
                "temperature": 0.0,
                "stream": True,
            }
            for _ in range(count)
        ]
        slots = asyncio.Semaphore(args.max_connections)
        tasks = [asyncio.ensure_future(one_stream(client, b, slots)) for b in bodies]
        results: list[dict] = []
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, timeout=5)
            results += [t.result() for t in done]
            kinds = Counter(r["kind"] for r in results)
            print(f"  {multiple}x ({count} streams): {len(results)} ended after "
                  f"{time.perf_counter() - started:.0f} s {dict(kinds)}", flush=True)  # fmt: skip
    elapsed = time.perf_counter() - started
    return {
        "multiple": multiple,
        "streams": count,
        "seconds": elapsed,
        "kinds": dict(Counter(r["kind"] for r in results)),
        "statuses": dict(Counter(str(r["status"]) for r in results)),
        "shed_with_retry_after": sum(1 for r in results if r["kind"] == "shed" and r["retry_after"]),
        "shed_in_openai_shape": sum(1 for r in results if r["kind"] == "shed" and r["openai_shape"]),
        "ttft_ok": percentiles([r["ttft"] for r in results if r["kind"] == "ok" and r["ttft"] is not None]),
        "shed_seconds": percentiles([r["seconds"] for r in results if r["kind"] == "shed"]),
        "after": await service_after(args, model),
    }


async def service_after(args: argparse.Namespace, model: str) -> dict:
    """Right after the level: how long until /health reads ok and one request completes."""
    started = time.perf_counter()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.url, timeout=30, headers=headers) as client:
        while time.perf_counter() - started < args.level_timeout:
            try:
                health = await client.get("/health")
                response = await client.post(
                    "/v1/completions", json={"model": model, "prompt": [5, 6], "max_tokens": 2}
                )
                if health.status_code == 200 and response.status_code == 200:
                    return {"normal_after_s": time.perf_counter() - started}
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    return {"normal_after_s": None}


async def main_async(args: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.url, timeout=30, headers=headers) as client:
        card = (await client.get("/v1/models")).json()["data"][0]
    levels = []
    for multiple in args.multiples:
        print(f"level {multiple}x capacity ({args.capacity})", flush=True)
        levels.append(await level(args, multiple, card["id"], card["vocab_size"]))
    return {"url": args.url, "model": card["id"], "capacity": args.capacity, "levels": levels}


def shed_times(stats: dict) -> str:
    return f"{stats['p50']:.2f} / {stats['p99']:.2f}" if stats.get("count") else "-"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", type=loopback_only)
    parser.add_argument("--api-key")
    parser.add_argument("--capacity", type=int, required=True,
                        help="sequences the server holds, running + queued (dev server: 8 x 64 + 512 = 1024)")  # fmt: skip
    parser.add_argument(
        "--multiples", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 4.0, 8.0]
    )
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--max-requests", type=int, default=40_000, help="streams a level at most")
    parser.add_argument(
        "--max-connections",
        type=int,
        default=16_000,
        help="connections open at once (a process may hold 20k files on the dev machine: more wait their turn)",
    )
    parser.add_argument(
        "--level-timeout", type=float, default=900.0, help="seconds a level (and a stream) at most"
    )
    parser.add_argument("--out", type=Path, default=Path("overload.json"))
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    write_json(args.out, result)
    rows = []
    for lv in result["levels"]:
        k, after = lv["kinds"], lv["after"]["normal_after_s"]
        rows.append(
            {
                "load": f"{lv['multiple']:g}x",
                "streams": lv["streams"],
                "200 done": k.get("ok", 0),
                "429/503": k.get("shed", 0),
                "with Retry-After": lv["shed_with_retry_after"],
                "OpenAI shape": lv["shed_in_openai_shape"],
                "other status": k.get("error_status", 0),
                "stream error": k.get("error_event", 0) + k.get("truncated", 0),
                "client error": k.get("client_error", 0),
                "seconds": f"{lv['seconds']:.0f}",
                "refused in p50 / p99 (s)": shed_times(lv["shed_seconds"]),
                "normal after (s)": "never" if after is None else f"{after:.1f}",
            }
        )
    print_table("overload", rows, list(rows[0]) if rows else [])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
