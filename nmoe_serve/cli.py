"""The `nmoe-serve` command: generate (offline API), doctor (preflight), make-tiny-checkpoint,
simulate (the scheduler against a step-cost model), fit-cost-model."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

DEFAULT_PROMPTS = [
    "The quick brown fox",
    "Expert parallelism splits the experts of a mixture-of-experts model",
    "Once upon a time",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nmoe-serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete prompts with the offline engine and print the results")
    gen.add_argument("--config", default="configs/dev.toml", help="TOML config (default: %(default)s)")
    gen.add_argument("--model", help="checkpoint directory, replacing the config's model")
    gen.add_argument(
        "--prompt", action="append", help="a prompt (repeat for several); default: three examples"
    )
    gen.add_argument(
        "--chat", action="store_true", help="send each prompt as a user message through the chat template"
    )
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--n", type=int, default=1)
    gen.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="engine option override, e.g. --option num_pages=256 (value parsed as JSON when it can be)",
    )
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    gen.add_argument("-v", "--verbose", action="store_true", help="log engine start-up and loading")

    doctor = sub.add_parser(
        "doctor", help="check config, model files, GPUs, NCCL and memory fit, with remedies"
    )
    doctor.add_argument("--config", default="configs/dev.toml", help="TOML config (default: %(default)s)")

    tiny = sub.add_parser(
        "make-tiny-checkpoint", help="write a tiny random DeepSeek-V3 checkpoint (HF layout)"
    )
    tiny.add_argument("--out", required=True, type=Path, help="output directory")
    tiny.add_argument("--fp8", action="store_true", help="FP8 e4m3 weights with 128x128 block scales")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument(
        "--mtp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write the multi-token-prediction layer after the last decoder layer, as DeepSeek-V3 "
        "checkpoints carry it (num_nextn_predict_layers = 1); --no-mtp leaves it out (default: --mtp)",
    )

    sim = sub.add_parser(
        "simulate",
        help="predict TTFT, ITL and throughput: the real scheduler of one EP group, clients, a step-cost model",
    )
    sim.add_argument(
        "--config", default="configs/benchmark_lmsys.toml", help="TOML config (default: %(default)s)"
    )
    sim.add_argument(
        "--cost-model",
        required=True,
        type=Path,
        help="step-cost model JSON (fit-cost-model; docs/perf/ has the fitted ones)",
    )
    sim.add_argument(
        "--workload", choices=("fixed", "chat"), default="fixed",
        help="fixed: every request P prompt + N output tokens, distinct prompts (default); chat: "
        "multi-turn conversations sharing a system prompt, each turn re-sending the conversation (sim/chat.py)",
    )  # fmt: skip
    clients = sim.add_mutually_exclusive_group()
    clients.add_argument(
        "--concurrency", type=int, help="fixed: C clients in a closed loop (bench/latency.py's)"
    )
    clients.add_argument("--rate", type=float, help="fixed: Poisson arrivals, requests per second")
    sim.add_argument("--prompt-tokens", type=int, help="fixed: P, prompt tokens per request")
    sim.add_argument(
        "--output-tokens", type=int, required=True, help="N, output tokens per request (EOS ignored)"
    )
    sim.add_argument(
        "--requests", type=int, help="fixed: requests in all (default: 2 x C; required with --rate)"
    )
    sim.add_argument("--conversations", type=int, help="chat: M conversations")
    sim.add_argument(
        "--conversation-rate", type=float,
        help="chat: conversations start as Poisson arrivals, per second (default: all at once)",
    )  # fmt: skip
    sim.add_argument(
        "--turns", type=int, default=4, help="chat: K turns per conversation (default %(default)s)"
    )
    sim.add_argument(
        "--system-prompt-tokens", type=int, default=2000,
        help="chat: S, the system prompt every conversation shares (default %(default)s)",
    )  # fmt: skip
    sim.add_argument(
        "--user-tokens", type=int, default=200, help="chat: U tokens per user message (default %(default)s)"
    )
    sim.add_argument(
        "--output-tokens-max", type=int,
        help="chat: answers of --output-tokens..this many tokens, drawn per turn (default: all --output-tokens)",
    )  # fmt: skip
    sim.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="engine option override, e.g. --set decode_prefill_tokens=512 (as `generate --option`)",
    )  # fmt: skip
    sim.add_argument(
        "--pages-per-rank", type=int, help="KV pages per rank (default: the config's cache.num_pages)"
    )
    sim.add_argument(
        "--coordinator-ms", type=float, default=0.0,
        help="the coordinator's turn between steps (bookkeeping + round trip; bench/step_overhead.py), default 0",
    )  # fmt: skip
    sim.add_argument(
        "--frontend-ms",
        type=float,
        default=0.0,
        help="front-end time per request before the scheduler sees it, one at a time (default 0)",
    )
    sim.add_argument(
        "--frontend-token-us",
        type=float,
        default=0.0,
        help="front-end time per streamed token, on the same server as the requests (default 0)",
    )
    sim.add_argument(
        "--serial", action="store_true", help="one step at a time (default: the config's scheduler.overlap)"
    )
    sim.add_argument(
        "--acceptance",
        type=float,
        default=0.8,
        help="speculative decoding ([speculative] in the config): the chance each draft is accepted given "
        "the ones before it were (assumed; default %(default)s)",
    )
    sim.add_argument(
        "--draft-ms",
        type=float,
        help="speculative decoding: the drafter's time per step on the slowest rank (bench/spec_step.py)",
    )
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--out", type=Path, default=Path("sim.json"), help="JSON out; the PNG goes beside it")

    fit = sub.add_parser("fit-cost-model", help="fit a step-cost model to measured step times")
    fit.add_argument(
        "--points", required=True, type=Path, help="points JSON (bench/step_costs.py writes one)"
    )
    fit.add_argument("--out", required=True, type=Path, help="cost model JSON to write")

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO
        if getattr(args, "verbose", args.command not in ("simulate", "fit-cost-model"))
        else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "doctor":
            from nmoe_serve.doctor import main as run_doctor

            return run_doctor(args.config)
        if args.command == "simulate":
            from nmoe_serve.sim.cli import simulate

            return simulate(args)
        if args.command == "fit-cost-model":
            from nmoe_serve.sim.cli import fit_cost_model

            return fit_cost_model(args)
        return _make_tiny(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"nmoe-serve {args.command}: error: {e}", file=sys.stderr)
        return 2


def _generate(args: argparse.Namespace) -> int:
    from nmoe_serve.llm import LLM
    from nmoe_serve.sampling.params import SamplingParams

    options = dict(_parse_option(o) for o in args.option)
    llm = LLM(args.model, config=args.config, **options)
    sampling = SamplingParams(
        n=args.n,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )
    prompts: list = list(args.prompt or DEFAULT_PROMPTS)
    if args.chat:
        if llm.tokenizer is None:
            raise ValueError("--chat needs a tokenizer with a chat template; the model has no tokenizer.json")
        prompts = [
            {
                "prompt_token_ids": llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]),
                "prompt": p,
            }
            for p in prompts
        ]
    started = time.perf_counter()
    outputs = llm.generate(prompts, sampling)
    elapsed = time.perf_counter() - started
    generated = 0
    for out in outputs:
        for completion in out.outputs:
            generated += len(completion.token_ids)
            if args.json:
                print(
                    json.dumps(
                        {
                            "prompt": out.prompt,
                            "prompt_token_ids": out.prompt_token_ids,
                            "index": completion.index,
                            "text": completion.text,
                            "token_ids": completion.token_ids,
                            "finish_reason": completion.finish_reason,
                        }
                    )
                )
            else:
                print(f"prompt: {out.prompt if out.prompt is not None else out.prompt_token_ids!r}")
                print(
                    f"  [{completion.index}] {completion.text!r}  ({len(completion.token_ids)} tokens, "
                    f"{completion.finish_reason})"
                )
    if not args.json:
        print(
            f"{len(outputs)} prompt(s), {generated} tokens in {elapsed:.2f} s on {llm.settings.device} "
            f"({llm.settings.model_name})"
        )
    llm.shutdown()
    return 0


def _make_tiny(args: argparse.Namespace) -> int:
    from nmoe_serve.model.tiny import make_tiny_checkpoint

    overrides = None if args.mtp else {"num_nextn_predict_layers": 0}
    out = make_tiny_checkpoint(args.out, seed=args.seed, fp8=args.fp8, overrides=overrides)
    kind = f"{'fp8' if args.fp8 else 'bf16'}, {'with' if args.mtp else 'without'} the MTP layer"
    print(f"wrote a tiny DeepSeek-V3 checkpoint ({kind}, seed {args.seed}) to {out}")
    return 0


def _parse_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--option {text!r}: write it as KEY=VALUE, e.g. --option num_pages=256")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


if __name__ == "__main__":
    raise SystemExit(main())
