"""Long prompts up to the context limit: every request finishes, with finite values, no deadlock.

    python bench/long_context.py --url http://127.0.0.1:8000 [--lengths 1024,32768,131000]
        [--output-tokens 16] [--concurrent 4] [--deadline 1800] [--out long_context.json]

Prompts are random token ids of each length (default: doubling up to max_model_len minus the
output). All are sent at once (bounded by --concurrent) and must finish before --deadline; every
token's logprob must be finite. Writes JSON and a PNG (latency against prompt length), prints a
table, shows progress, and exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import time
from pathlib import Path

import httpx
from report import new_figure, print_table, save_figure, write_json


async def one(client: httpx.AsyncClient, model: str, vocab: int, length: int, output: int, seed: int) -> dict:
    rng = random.Random(seed)
    body = {
        "model": model,
        "prompt": [rng.randrange(1, vocab) for _ in range(length)],
        "max_tokens": output,
        "ignore_eos": True,
        "temperature": 0.0,
        "logprobs": 1,
    }
    started = time.perf_counter()
    response = await client.post("/v1/completions", json=body)
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        return {"length": length, "ok": False, "seconds": seconds, "error": response.text[:300]}
    choice = response.json()["choices"][0]
    values = choice["logprobs"]["token_logprobs"]
    finite = all(v is not None and math.isfinite(v) for v in values)
    ok = finite and len(values) == output and choice["finish_reason"] == "length"
    return {
        "length": length,
        "ok": ok,
        "seconds": seconds,
        "tokens": len(values),
        "finite": finite,
        "finish_reason": choice["finish_reason"],
    }


async def run(args: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=args.deadline) as client:
        info = (await client.get("/v1/models")).json()["data"][0]
        model, vocab, limit = info["id"], int(info.get("vocab_size", 1000)), int(info["max_model_len"])
        lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else []
        if not lengths:
            n = 1024
            while n < limit - args.output_tokens:
                lengths.append(n)
                n *= 2
            lengths.append(limit - args.output_tokens)
        semaphore = asyncio.Semaphore(args.concurrent)
        started = time.perf_counter()
        results: list[dict] = []

        async def bounded(length: int, seed: int) -> None:
            async with semaphore:
                results.append(await one(client, model, vocab, length, args.output_tokens, seed))
                r = results[-1]
                print(
                    f"  {length:>7} tokens: {'ok' if r['ok'] else 'FAILED'} in {r['seconds']:.1f} s "
                    f"[{len(results)}/{len(lengths)}, {time.perf_counter() - started:.0f} s]",
                    flush=True,
                )

        try:
            await asyncio.wait_for(
                asyncio.gather(*(bounded(n, i) for i, n in enumerate(lengths))), args.deadline
            )
            deadlocked = False
        except TimeoutError:
            deadlocked = True
    return {
        "model": model,
        "max_model_len": limit,
        "lengths": lengths,
        "output_tokens": args.output_tokens,
        "results": sorted(results, key=lambda r: r["length"]),
        "deadlocked": deadlocked,
        "all_ok": not deadlocked and len(results) == len(lengths) and all(r["ok"] for r in results),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key")
    parser.add_argument("--lengths", help="comma-separated prompt lengths")
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--concurrent", type=int, default=4)
    parser.add_argument("--deadline", type=float, default=1800.0, help="seconds for all requests together")
    parser.add_argument("--out", type=Path, default=Path("long_context.json"))
    args = parser.parse_args()
    print(f"long context -> {args.url}", flush=True)
    result = asyncio.run(run(args))
    print_table(
        f"all ok: {result['all_ok']}, deadlocked: {result['deadlocked']}",
        result["results"],
        ["length", "ok", "seconds", "tokens", "finite", "finish_reason"],
    )
    write_json(args.out, result)
    fig, axes = new_figure()
    ax = axes[0][0]
    done = result["results"]
    ax.plot([r["length"] for r in done], [r["seconds"] for r in done], marker="o")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("request latency (s)")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    save_figure(fig, args.out.with_suffix(".png"))
    return 0 if result["all_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
