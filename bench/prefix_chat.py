"""Prefix caching on a multi-turn chat workload, over HTTP, on the CPU tiny model.

    python bench/prefix_chat.py [--conversations 16 --turns 4 --system-tokens 256 --user-tokens 32 \
        --output-tokens 16] [--setups ep1-off,ep1-on,ep8-off,ep8-on,ep8-unbounded,ep8-least-loaded] \
        [--out-dir prefix_chat]

Each conversation shares one system prompt; each turn sends the whole conversation so far (system,
then every user message and the answer to it, as token ids) plus a new user message, and streams
the answer (greedy, ignore_eos). The conversations run concurrently, one turn after another.

For each setup, a local Ray cluster of our own serves configs/dev.toml (`serve run`, bench/
sim_check.py `served`) with that setup's overrides:
  ep1-off / ep1-on: one rank, the prefix cache off / on;
  ep8-off / ep8-on: 8 ranks, off / on (cache-aware rank choice, the default imbalance bound);
  ep8-unbounded: 8 ranks, no bound (max_rank_imbalance 10000): the cache decides alone;
  ep8-least-loaded: 8 ranks, bound 0: only the least loaded ranks, the cache breaking ties.
Reported per setup: hit rate (cached / prompt tokens, from usage.prompt_tokens_details), prefill
tokens saved (cached tokens), TTFT p50/p99 (first streamed token), the wall time, and the rank
balance: first admissions per rank (the Coordinator's scheduler_pages), with max/mean.

Writes <out-dir>/prefix_chat.json and prints a table. Run it on a quiet machine: the CPU ranks share
the cores with everything else.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
from report import percentiles, print_table, write_json
from sim_check import served

SETUPS: dict[str, dict[str, object]] = {
    "ep1-off": {"ep_size": 1, "enable_prefix_caching": False},
    "ep1-on": {"ep_size": 1},
    "ep8-off": {"ep_size": 8, "enable_prefix_caching": False},
    "ep8-on": {"ep_size": 8},
    "ep8-unbounded": {"ep_size": 8, "max_rank_imbalance": 10_000},
    "ep8-least-loaded": {"ep_size": 8, "max_rank_imbalance": 0},
}

RANK_LOAD = """
import json, sys, ray
from ray import serve
ray.init(address=sys.argv[1], _node_ip_address="127.0.0.1", logging_level="ERROR")
handle = serve.get_deployment_handle("Coordinator", app_name="nmoe")
print(json.dumps(handle.scheduler_pages.remote().result()))
"""


def rank_load(gcs: int, env: dict[str, str]) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", RANK_LOAD, f"127.0.0.1:{gcs}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode:
        raise SystemExit(f"reading the ranks' load failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


async def turn(client: httpx.AsyncClient, prompt: list[int], output_tokens: int) -> dict:
    body = {
        "model": "tiny-seed0",
        "prompt": prompt,
        "max_tokens": output_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    ttft, tokens, usage = None, [], None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"HTTP {response.status_code}: {(await response.aread())[:500]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                ttft = ttft if ttft is not None else time.perf_counter() - started
                tokens.append(chunk["choices"][0]["text"])
    assert usage is not None, "no usage chunk: the server must send stream_options.include_usage"
    return {
        "ttft_s": ttft or 0.0,
        "text": "".join(tokens),
        "prompt_tokens": usage["prompt_tokens"],
        "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
        "completion_tokens": usage["completion_tokens"],
    }


async def conversation(
    client: httpx.AsyncClient, system: list[int], rng: random.Random, args: argparse.Namespace, answers: list
) -> list[dict]:
    history = list(system)
    results = []
    for _ in range(args.turns):
        history += [rng.randrange(1, 496) for _ in range(args.user_tokens)]
        result = await turn(client, history, args.output_tokens)
        results.append(result)
        # the answer's token ids: the tiny tokenizer's text is not reversible, so the next turn carries
        # fresh ids for the answer; the prefix up to this turn's prompt is what the cache can hold
        history += [rng.randrange(1, 496) for _ in range(args.output_tokens)]
        answers.append(result["text"])
    return results


async def workload(url: str, args: argparse.Namespace) -> tuple[list[dict], list[str], float]:
    rng = random.Random(args.seed)
    system = [rng.randrange(1, 496) for _ in range(args.system_tokens)]
    seeds = [rng.randrange(2**31) for _ in range(args.conversations)]
    answers: list[str] = []
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        runs = await asyncio.gather(
            *(conversation(client, system, random.Random(s), args, answers) for s in seeds)
        )
    return [r for run in runs for r in run], answers, time.perf_counter() - started


def summarize(name: str, turns: list[dict], load: dict, wall_s: float) -> dict:
    prompt = sum(t["prompt_tokens"] for t in turns)
    cached = sum(t["cached_tokens"] for t in turns)
    admitted = load.get("admitted", [])
    mean = sum(admitted) / len(admitted) if admitted else 0.0
    ttft = percentiles([t["ttft_s"] for t in turns], 1e3)
    return {
        "setup": name,
        "overrides": SETUPS[name],
        "requests": len(turns),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "hit_rate": cached / prompt if prompt else 0.0,
        "prefill_tokens_computed": prompt - cached,
        "ttft_ms_p50": ttft["p50"],
        "ttft_ms_p99": ttft["p99"],
        "wall_s": wall_s,
        "admitted_by_rank": admitted,
        "rank_max_over_mean": max(admitted) / mean if mean else 0.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-tokens", type=int, default=256)
    parser.add_argument("--user-tokens", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, of {', '.join(SETUPS)}")
    parser.add_argument("--out-dir", type=Path, default=Path("prefix_chat"))
    args = parser.parse_args()
    setups = args.setups.split(",")
    unknown = [s for s in setups if s not in SETUPS]
    if unknown:
        raise SystemExit(f"--setups: unknown {unknown}; choose from {', '.join(SETUPS)}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}
    rows, texts = [], {}
    for name in setups:
        overrides = {**SETUPS[name], "num_pages": 512, "max_seq_len": 2048, "step_timeout_s": 120}
        with served(args.out_dir, env, overrides, name) as (url, gcs):
            asyncio.run(workload(url, argparse.Namespace(**{**vars(args), "conversations": 2, "turns": 1})))
            base = rank_load(gcs, env)  # the warm-up's admissions, subtracted below
            turns, answers, wall_s = asyncio.run(workload(url, args))
            load = rank_load(gcs, env)
        load["admitted"] = [a - b for a, b in zip(load["admitted"], base["admitted"], strict=True)]
        rows.append(summarize(name, turns, load, wall_s))
        texts[name] = sorted(answers)
        print(json.dumps(rows[-1]), flush=True)
    same = len({json.dumps(t) for t in texts.values()}) == 1
    payload = {
        "workload": {k: v for k, v in vars(args).items() if k not in ("out_dir", "setups")},
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()},
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "same_answers_in_every_setup": same,
        "setups": rows,
    }
    write_json(args.out_dir / "prefix_chat.json", payload)
    print_table(
        "prefix caching, multi-turn chat (CPU tiny model, HTTP)",
        rows,
        ["setup", "requests", "hit_rate", "cached_tokens", "prefill_tokens_computed", "ttft_ms_p50",
         "ttft_ms_p99", "wall_s", "rank_max_over_mean"],
    )  # fmt: skip
    print("greedy answers identical in every setup:", same)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
