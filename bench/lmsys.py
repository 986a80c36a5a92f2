"""Engine capacity at the LMSYS point: prefill tok/s at 2000-token prompts, decode tok/s at a fixed
per-rank batch with context 2000 and 100 output tokens (EOS ignored).

    python bench/lmsys.py --config configs/benchmark_lmsys.toml [--seqs-per-rank 256] [--out lmsys.json]
    python bench/lmsys.py --config configs/dev.toml --set ep_size=2 --prompt-tokens 64 \
        --output-tokens 8 --seqs-per-rank 4          # a tiny run on the CPU

or as a Ray job: `ray job submit --working-dir . -- python bench/lmsys.py ...`. It drives the
engine directly (no HTTP), so the figures are the engine's own capacity. Prefill: each rank gets
`--prefill-seqs-per-rank` prompts with max_tokens 1; tok/s = prompt tokens / time of those steps.
Decode: each rank gets `--seqs-per-rank` requests; once every one is decoding, the next
`--output-tokens` steps are timed; tok/s = tokens generated / time. Writes JSON and a PNG, prints
a table and shows progress.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from report import new_figure, print_table, save_figure, write_json

from nmoe_serve.llm import LLM
from nmoe_serve.sampling.params import SamplingParams

TARGETS = {"prefill_tok_per_s_node": 60_000, "decode_tok_per_s_node": 25_000}


def parse_set(items: list[str]) -> dict:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: write KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def prefill_phase(llm: LLM, ranks: int, args: argparse.Namespace, rng: random.Random) -> dict:
    engine = llm.engine
    count = ranks * args.prefill_seqs_per_rank
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for i in range(count):
        engine.add_request(
            f"prefill-{i}", [rng.randrange(1, args.vocab) for _ in range(args.prompt_tokens)], params
        )
    started, steps, done = time.perf_counter(), 0, 0
    while engine.has_work():
        done += sum(1 for u in engine.step() if u.finish_reason is not None)
        steps += 1
        if steps % 10 == 0:
            print(f"  prefill: {done}/{count} prompts, {time.perf_counter() - started:.1f} s", flush=True)
    seconds = time.perf_counter() - started
    return {
        "prompts": count,
        "prompt_tokens": count * args.prompt_tokens,
        "steps": steps,
        "seconds": seconds,
        "tok_per_s": count * args.prompt_tokens / seconds,
    }


def decode_phase(llm: LLM, ranks: int, args: argparse.Namespace, rng: random.Random) -> dict:
    engine, scheduler = llm.engine, llm.engine.scheduler
    count = ranks * args.seqs_per_rank
    params = SamplingParams(max_tokens=args.output_tokens + 1, temperature=0.0, ignore_eos=True)
    for i in range(count):
        engine.add_request(
            f"decode-{i}", [rng.randrange(1, args.vocab) for _ in range(args.prompt_tokens)], params
        )
    started = time.perf_counter()
    while scheduler.waiting or any(r.prefilling for rank in scheduler.running for r in rank):
        engine.step()
        if not any(r.prefilling for rank in scheduler.running for r in rank) and scheduler.waiting:
            break  # what could be admitted is decoding; the rest waits for pages or sequence slots
    running = scheduler.num_running
    print(
        f"  decode: {running}/{count} sequences running after {time.perf_counter() - started:.1f} s of prefill",
        flush=True,
    )
    tokens, step_times = 0, []
    for step in range(args.output_tokens):
        t0 = time.perf_counter()
        tokens += len(engine.step())
        step_times.append(time.perf_counter() - t0)
        if step % max(1, args.output_tokens // 5) == 0:
            print(f"  decode: step {step}/{args.output_tokens}, {step_times[-1] * 1e3:.1f} ms", flush=True)
    seconds = sum(step_times)
    for i in range(count):
        engine.abort(f"decode-{i}")
    while engine.has_work():
        engine.step()
    return {
        "requests": count,
        "running": running,
        "steps": len(step_times),
        "tokens": tokens,
        "seconds": seconds,
        "tok_per_s": tokens / seconds,
        "step_ms_mean": 1e3 * seconds / len(step_times),
        "step_ms_max": 1e3 * max(step_times),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/benchmark_lmsys.toml")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="engine option override"
    )
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--output-tokens", type=int, default=100)
    parser.add_argument("--seqs-per-rank", type=int, default=256)
    parser.add_argument("--prefill-seqs-per-rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("lmsys.json"))
    args = parser.parse_args()
    print(f"lmsys: loading {args.config} {args.set}", flush=True)
    llm = LLM(config=args.config, **parse_set(args.set))
    ranks = llm.engine.limits.num_ranks
    args.vocab = llm.settings.args.vocab_size
    rng = random.Random(args.seed)
    prefill = prefill_phase(llm, ranks, args, rng)
    decode = decode_phase(llm, ranks, args, rng)
    llm.shutdown()
    node_scale = 8 / ranks  # a node has 8 ranks
    result = {
        "config": args.config,
        "overrides": args.set,
        "model": llm.settings.model_name,
        "device": llm.settings.device,
        "ranks": ranks,
        "prompt_tokens": args.prompt_tokens,
        "output_tokens": args.output_tokens,
        "seqs_per_rank": args.seqs_per_rank,
        "prefill": prefill,
        "decode": decode,
        "prefill_tok_per_s_node": prefill["tok_per_s"] * node_scale,
        "decode_tok_per_s_node": decode["tok_per_s"] * node_scale,
        "targets": TARGETS,
    }
    rows = [
        {
            "phase": "prefill",
            "tok/s": prefill["tok_per_s"],
            "tok/s per 8-rank node": result["prefill_tok_per_s_node"],
            "target": TARGETS["prefill_tok_per_s_node"],
            "steps": prefill["steps"],
            "seconds": prefill["seconds"],
        },
        {
            "phase": "decode",
            "tok/s": decode["tok_per_s"],
            "tok/s per 8-rank node": result["decode_tok_per_s_node"],
            "target": TARGETS["decode_tok_per_s_node"],
            "steps": decode["steps"],
            "seconds": decode["seconds"],
        },
    ]
    print_table(
        f"{ranks} rank(s) on {llm.settings.device}, {decode['running']} sequences decoding",
        rows,
        ["phase", "tok/s", "tok/s per 8-rank node", "target", "steps", "seconds"],
    )
    write_json(args.out, result)
    fig, axes = new_figure(1, 2, (9, 3.5))
    for ax, key, label in zip(
        axes[0], ("prefill_tok_per_s_node", "decode_tok_per_s_node"), ("prefill", "decode"), strict=True
    ):
        ax.bar(["measured", "target"], [result[key], TARGETS[key]], color=["tab:blue", "tab:gray"])
        ax.set_title(f"{label} tok/s per node")
    save_figure(fig, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
