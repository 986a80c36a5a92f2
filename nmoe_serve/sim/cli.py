"""`nmoe-serve simulate` and `nmoe-serve fit-cost-model` (argument parsing lives in nmoe_serve/cli.py)."""

from __future__ import annotations

import argparse
import json

from nmoe_serve.config import ConfigError, ServeConfig
from nmoe_serve.engine.scheduler import SchedulerLimits
from nmoe_serve.sim.chat import ChatWorkload
from nmoe_serve.sim.cost_model import StepCostModel, load_points
from nmoe_serve.sim.report import print_summary, write_json, write_png
from nmoe_serve.sim.simulator import Simulator, Speculation
from nmoe_serve.sim.workload import Workload, WorkloadError


def scheduler_limits(config: ServeConfig, pages_per_rank: int | None) -> SchedulerLimits:
    """The scheduler limits of one EP group of `config`, without its checkpoint or devices."""
    pages = pages_per_rank if pages_per_rank is not None else config.cache.num_pages
    if pages is None:
        raise ConfigError(
            "the simulator needs the KV pages per rank: set cache.num_pages in the config or pass "
            "--pages-per-rank (nmoe-serve doctor prints what the GPUs hold)"
        )
    if config.model.max_seq_len is None:
        raise ConfigError("the simulator needs model.max_seq_len in the config (or --set max_seq_len=...)")
    scheduler = config.scheduler
    return SchedulerLimits(
        num_ranks=config.parallel.ep_size,
        pages_per_rank=pages,
        page_size=config.cache.page_size,
        max_seq_len=config.model.max_seq_len,
        max_num_seqs=scheduler.max_num_seqs,
        max_prefill_tokens=scheduler.max_prefill_tokens,
        max_prefill_steps_in_a_row=scheduler.max_prefill_steps_in_a_row,
        watermark_pages=int(scheduler.admission_watermark * pages),
        decode_prefill_tokens=scheduler.decode_prefill_tokens,
        prefix_caching=config.cache.enable_prefix_caching,
        max_rank_imbalance=config.cache.max_rank_imbalance,
        num_draft_tokens=config.speculative.num_draft_tokens if config.speculative.method == "mtp" else 0,
    )


def read_config(path: str, overrides: dict[str, object]) -> ServeConfig:
    try:
        return ServeConfig.from_toml(path, overrides=overrides)
    except ConfigError as e:
        if "environment variable" in str(e):
            raise ConfigError(
                f"{e}\n(the simulator reads no model files: any value works, e.g. NMOE_MODEL_PATH=/unused)"
            ) from None
        raise


def simulate(args: argparse.Namespace) -> int:
    overrides = dict(_parse_set(item) for item in args.set)
    config = read_config(args.config, overrides)
    limits = scheduler_limits(config, args.pages_per_rank)
    if min(args.coordinator_ms, args.frontend_ms, args.frontend_token_us) < 0:
        raise WorkloadError(
            "--coordinator-ms, --frontend-ms and --frontend-token-us must be >= 0, got "
            f"{args.coordinator_ms}, {args.frontend_ms} and {args.frontend_token_us}"
        )
    workload = chat_workload(args) if args.workload == "chat" else fixed_workload(args)
    cost = StepCostModel.load(args.cost_model)
    overlap = config.scheduler.overlap and not args.serial
    speculation = None
    if limits.num_draft_tokens:
        if args.draft_ms is None:
            raise WorkloadError(
                "the config enables speculative decoding: pass --draft-ms (the drafter's time per step, "
                "measured by bench/spec_step.py) and --acceptance (the chance a draft is accepted)"
            )
        speculation = Speculation(args.acceptance, args.draft_ms / 1e3)
    simulator = Simulator(
        limits,
        cost,
        overlap=overlap,
        coordinator_s=args.coordinator_ms / 1e3,
        frontend_s=args.frontend_ms / 1e3,
        speculation=speculation,
    )
    print(
        f"simulate: {workload.describe()} on {limits.num_ranks} rank(s), {limits.max_num_seqs} seqs/rank, "
        f"{limits.pages_per_rank} pages of {limits.page_size}; {'overlapped' if overlap else 'serial'} steps, "
        f"coordinator {args.coordinator_ms:g} ms, front end {args.frontend_ms:g} ms + "
        f"{args.frontend_token_us:g} us a token; cost model {args.cost_model} ({cost.source}, {cost.date})",
        flush=True,
    )
    result = simulator.run(workload, progress=lambda line: print(f"  {line}", flush=True))
    title = f"{workload.describe()}, {limits.num_ranks} ranks ({'overlap' if overlap else 'serial'})"
    print_summary(result, f"simulated: {title}")
    settings = {
        "config": str(args.config),
        "overrides": overrides,
        "limits": limits.__dict__,
        "overlap": overlap,
        "coordinator_ms": args.coordinator_ms,
        "frontend_ms": args.frontend_ms,
        "frontend_token_us": args.frontend_token_us,
        "cost_model": cost.provenance(args.cost_model),
        "speculation": None
        if speculation is None
        else {
            "num_draft_tokens": limits.num_draft_tokens,
            "acceptance": speculation.acceptance,
            "draft_ms": args.draft_ms,
            "assumed": "acceptance independent per draft",
        },
        "prediction": "simulated, not measured",
    }
    write_json(result, args.out, settings)
    write_png(result, args.out.with_suffix(".png"), f"simulated: {title}")
    return 0


def fixed_workload(args: argparse.Namespace) -> Workload:
    if (
        args.conversations is not None
        or args.output_tokens_max is not None
        or args.conversation_rate is not None
    ):
        raise WorkloadError(
            "--conversations, --conversation-rate and --output-tokens-max are for --workload chat"
        )
    if args.prompt_tokens is None:
        raise WorkloadError("--workload fixed needs --prompt-tokens (P, prompt tokens per request)")
    if args.requests is None and args.rate is not None:
        raise WorkloadError("--rate needs --requests (how many arrive in all)")
    if args.concurrency is None and args.rate is None:
        raise WorkloadError("give exactly one of --concurrency (closed loop) or --rate (Poisson arrivals)")
    return Workload(
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        requests=args.requests if args.requests is not None else 2 * args.concurrency,
        concurrency=args.concurrency,
        rate=args.rate,
        seed=args.seed,
    )


def chat_workload(args: argparse.Namespace) -> ChatWorkload:
    given = [
        name
        for name, value in (
            ("--concurrency", args.concurrency),
            ("--rate", args.rate),
            ("--prompt-tokens", args.prompt_tokens),
            ("--requests", args.requests),
        )
        if value is not None
    ]
    if given:
        raise WorkloadError(
            f"{', '.join(given)}: not for --workload chat (its prompts grow turn by turn; give "
            "--conversations, --turns, --system-prompt-tokens, --user-tokens)"
        )
    if args.conversations is None:
        raise WorkloadError("--workload chat needs --conversations (M)")
    return ChatWorkload(
        conversations=args.conversations,
        turns=args.turns,
        system_prompt_tokens=args.system_prompt_tokens,
        user_tokens=args.user_tokens,
        output_tokens=args.output_tokens,
        output_tokens_max=args.output_tokens_max,
        conversation_rate=args.conversation_rate,
        seed=args.seed,
    )


def fit_cost_model(args: argparse.Namespace) -> int:
    points, source, date = load_points(args.points)
    model = StepCostModel.fit_points(points, source, date)
    model.save(args.out)
    print(f"fitted {len(points)} points of {args.points} ({source}, {date}) -> {args.out}")
    for kind, coefficients in model.coefficients.items():
        fit = model.fit[kind]
        terms = ", ".join(f"{name} {value:.4g} s" for name, value in coefficients.items())
        print(
            f"  {kind}: {terms}; {int(fit['points'])} points, relative error mean "
            f"{fit['mean_relative_error']:.1%}, max {fit['max_relative_error']:.1%}"
        )
    return 0


def _parse_set(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--set {text!r}: write it as KEY=VALUE, e.g. --set decode_prefill_tokens=512")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value
