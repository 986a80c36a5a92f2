"""Streaming latency over HTTP: TTFT, ITL and end-to-end at concurrency C, prompt P, output N.

    python bench/latency.py --url http://127.0.0.1:8000 --concurrency 256 --prompt-tokens 2000 \
        --output-tokens 100 --requests 512 [--api-key KEY] [--out latency.json]

or as a Ray job: `ray job submit --working-dir . -- python bench/latency.py ...`. Prompts are
random token ids (exactly P tokens); outputs ignore EOS (exactly N tokens). TTFT is from sending
the request to the first streamed token, ITL the gaps between streamed chunks of one request.
Writes JSON and a PNG (latency CDFs), prints a summary table, and shows progress while it runs.
A token whose text is still incomplete (a partial UTF-8 character) streams no chunk, so its gap
merges into the next; `--token-chunks` asks for logprobs, so every token streams a chunk and the
ITL is per token (what the simulator predicts).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import sys
import time
from pathlib import Path

import httpx
from report import new_figure, percentiles, print_table, save_figure, write_json


async def one_request(
    client: httpx.AsyncClient, args: argparse.Namespace, model: str, vocab: int, rng: random.Random
) -> dict:
    body = {
        "model": model,
        "prompt": [rng.randrange(1, vocab) for _ in range(args.prompt_tokens)],
        "max_tokens": args.output_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.token_chunks:
        body["logprobs"] = 0
    sent = time.perf_counter()
    chunks: list[float] = []
    usage, error = None, None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return {"error": f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]["message"]
            elif event.get("usage"):
                usage = event["usage"]
            elif event["choices"] and _carries_tokens(event["choices"][0], args.token_chunks):
                chunks.append(time.perf_counter())
    done = time.perf_counter()
    if error or not chunks:
        return {"error": error or "no tokens streamed"}
    return {
        "ttft": chunks[0] - sent,
        "itl": [b - a for a, b in itertools.pairwise(chunks)],
        "e2e": done - sent,
        "tokens": (usage or {}).get("completion_tokens", len(chunks)),
    }


def _carries_tokens(choice: dict, token_chunks: bool) -> bool:
    if token_chunks:
        return bool((choice.get("logprobs") or {}).get("tokens"))
    return bool(choice.get("text"))


async def run(args: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 8)
    async with httpx.AsyncClient(
        base_url=args.url, headers=headers, timeout=args.timeout, limits=limits
    ) as client:
        info = (await client.get("/v1/models")).json()["data"][0]
        model, vocab = info["id"], int(info.get("vocab_size", 1000))
        semaphore = asyncio.Semaphore(args.concurrency)
        rng = random.Random(args.seed)
        results: list[dict] = []
        started = time.perf_counter()

        async def bounded() -> None:
            async with semaphore:
                results.append(await one_request(client, args, model, vocab, rng))
                if len(results) % max(1, args.requests // 10) == 0:
                    print(
                        f"  {len(results)}/{args.requests} requests done, {time.perf_counter() - started:.1f} s",
                        flush=True,
                    )

        await asyncio.gather(*(bounded() for _ in range(args.requests)))
        elapsed = time.perf_counter() - started
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "model": model,
        "concurrency": args.concurrency,
        "prompt_tokens": args.prompt_tokens,
        "output_tokens": args.output_tokens,
        "requests": args.requests,
        "token_chunks": args.token_chunks,
        "completed": len(ok),
        "errors": errors[:10],
        "error_count": len(errors),
        "seconds": elapsed,
        "output_tokens_per_s": tokens / elapsed,
        "requests_per_s": len(ok) / elapsed,
        "ttft_s": percentiles([r["ttft"] for r in ok]),
        "itl_s": percentiles([g for r in ok for g in r["itl"]]),
        "e2e_s": percentiles([r["e2e"] for r in ok]),
        "raw": {"ttft": [r["ttft"] for r in ok], "itl": [g for r in ok for g in r["itl"]][:100_000]},
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--token-chunks", action="store_true", help="a chunk per token (asks logprobs=0): per-token ITL"
    )
    parser.add_argument("--out", type=Path, default=Path("latency.json"))
    args = parser.parse_args()
    args.requests = args.requests or 2 * args.concurrency
    print(
        f"latency: {args.requests} requests at concurrency {args.concurrency}, prompt {args.prompt_tokens}, "
        f"output {args.output_tokens} tokens -> {args.url}",
        flush=True,
    )
    result = asyncio.run(run(args))
    rows = [
        {"metric": name, **{k: v * 1e3 for k, v in result[key].items() if k != "count"}}
        for name, key in (("TTFT ms", "ttft_s"), ("ITL ms", "itl_s"), ("E2E ms", "e2e_s"))
    ]
    print_table(
        f"{result['completed']}/{result['requests']} ok, {result['output_tokens_per_s']:.1f} output tok/s",
        rows,
        ["metric", "p50", "p90", "p99", "mean", "max"],
    )
    raw = result.pop("raw")
    write_json(args.out, result)
    fig, axes = new_figure(1, 2)
    for ax, (name, values) in zip(axes[0], (("TTFT (s)", raw["ttft"]), ("ITL (s)", raw["itl"])), strict=True):
        ordered = sorted(values)
        ax.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))])
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of samples")
        ax.grid(alpha=0.3)
    fig.suptitle(f"C={args.concurrency} P={args.prompt_tokens} N={args.output_tokens}")
    save_figure(fig, args.out.with_suffix(".png"))
    if result["error_count"]:
        print(f"{result['error_count']} request(s) failed, e.g. {result['errors'][0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
