"""Simulator: the real Scheduler of one EP group on a virtual clock, steps timed by a StepCostModel.

No worker runs: every plan the scheduler makes is priced by the cost model (its slowest rank) and
answered with made-up tokens (the workload ignores EOS, so their values do not matter). Clients
(sim/workload.py, sim/chat.py) send requests; a token counts as streamed when the step that sampled
it ends.

Prefix caching: the scheduler's own per-rank cache runs as served (SchedulerLimits.prefix_caching).
A step's plans carry only the tokens it computes (query_lens start after a request's cached
prefix), so the cost model charges prefill for the uncached tokens alone; the cached ones still
count as context (S) and as keys of the attention pairs (A). The result reports the cache's hit
rate and each rank's first admissions.

Timing of the coordinator: `coordinator_s` is its turn between steps (results in, bookkeeping,
next plans out: bench/step_overhead.py measures it). One step at a time, the ranks wait for it
after every step. With overlap (the engine's default) the scheduler plans step n+1 while step n
runs, exactly as the engine core does (max_steps_in_flight = 2), and the ranks start step n+1 when
both step n has ended and its plans are out: the coordinator's turn is hidden while it is shorter
than a step.

The front end (FrontEnd): one server, first come first served, that spends `frontend_s` on each
arriving request (HTTP, validation, tokenization, the call to the coordinator) before the
scheduler sees it, and `frontend_token_s` on each token it streams back; a client sees a token
when the front end has sent it. Both 0 (the default) leave it out. Its times are not measured
here: bench/sim_check.py fits them to served TTFTs at other concurrencies.

Speculative decoding (`Speculation`, with SchedulerLimits.num_draft_tokens = k): every decode step
is a verify step of 1 + k tokens per sequence, priced by the cost model as the decode step of its
token rows (StepShape.of) plus the drafts' `draft_s`; each sequence accepts its drafts one after
another with probability `acceptance` each (independently, a stated assumption) up to the first
rejection, so it gets 1 to 1 + k tokens a step. Steps run one at a time, as served.

Not modelled: the all-to-all's own time (taken to hide under compute, as rank_sim assumes),
detokenization and streaming (their CPU time is in step times measured as served), load imbalance
between the experts.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from nmoe_serve.engine.plan import StepKind, StepPlan, StepResult
from nmoe_serve.engine.request import RequestRejected
from nmoe_serve.engine.scheduler import Scheduler, SchedulerLimits
from nmoe_serve.sampling.params import SamplingParams
from nmoe_serve.sim.cost_model import StepCostModel
from nmoe_serve.sim.workload import ClientModel, WorkloadError

MAX_SERIES = 4000  # time-series points kept in a result (evenly thinned)


@dataclass(frozen=True)
class Speculation:
    """Speculative decoding in the simulator: the drafts' acceptance and cost (assumed or measured:
    bench/spec_step.py measures draft_s for one rank)."""

    acceptance: float  # probability that a draft is accepted, given the ones before it were
    draft_s: float  # the drafter's seconds per step (the MTP layer's passes), on the slowest rank
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.acceptance <= 1.0 or self.draft_s < 0:
            raise WorkloadError(
                f"speculation: acceptance must be in [0, 1] and draft seconds >= 0, got {self.acceptance} "
                f"and {self.draft_s}"
            )


class FrontEnd:
    """A single first-come-first-served server in front of the scheduler (see the module docstring)."""

    def __init__(self, request_s: float, token_s: float) -> None:
        self.request_s, self.token_s, self.free = request_s, token_s, 0.0

    def request(self, at: float) -> float:
        """When a request sent at `at` reaches the scheduler."""
        self.free = max(at, self.free) + self.request_s
        return self.free

    def token(self, at: float) -> float:
        """When a token ready at `at` reaches its client."""
        self.free = max(at, self.free) + self.token_s
        return self.free


@dataclass
class _Stream:
    arrival: float
    client: int
    token_times: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)


@dataclass
class SimResult:
    """What a simulated run measured; `summary()` is its JSON-ready digest."""

    workload: ClientModel
    makespan_s: float
    prompt_tokens: int  # prefill tokens computed (cached ones left out, recomputation after preemption in)
    output_tokens: int
    ttft_s: list[float]
    itl_s: list[float]
    e2e_s: list[float]
    series: dict[
        str, list[float]
    ]  # per step: t, step_s, kind (0 prefill, 1 decode), waiting, running, kv_usage, preemptions
    steps: int
    preemptions: int
    wall_s: float
    prompt_tokens_sent: int = 0  # the requests' prompts, summed
    cached_tokens: int = 0  # of those, found in the prefix cache at first admission
    prefix_caching: bool = False
    admitted_by_rank: list[int] = field(default_factory=list)  # first admissions per rank

    def summary(self) -> dict[str, object]:
        kinds = np.array(self.series["kind"])
        step_s = np.array(self.series["step_s"])
        return {
            "workload": self.workload.describe(),
            "requests": self.workload.requests,
            "makespan_s": self.makespan_s,
            "steps": self.steps,
            "prefill_steps": int((kinds == 0).sum()),
            "decode_steps": int((kinds == 1).sum()),
            "preemptions": self.preemptions,
            "prefill_tok_per_s": self.prompt_tokens / self.makespan_s,
            "decode_tok_per_s": self.output_tokens / self.makespan_s,
            "ttft_s": percentiles(self.ttft_s),
            "itl_s": percentiles(self.itl_s),
            "e2e_s": percentiles(self.e2e_s),
            "decode_step_s": percentiles(step_s[kinds == 1].tolist()),
            "prefill_step_s": percentiles(step_s[kinds == 0].tolist()),
            "prefix_cache": {
                "enabled": self.prefix_caching,
                "prompt_tokens": self.prompt_tokens_sent,
                "cached_tokens": self.cached_tokens,
                "hit_rate": self.cached_tokens / self.prompt_tokens_sent if self.prompt_tokens_sent else 0.0,
                "prefill_tokens_computed": self.prompt_tokens,
            },
            "admitted_by_rank": self.admitted_by_rank,
            "rank_max_over_mean": _max_over_mean(self.admitted_by_rank),
            "simulator_wall_s": self.wall_s,
        }


def _max_over_mean(values: list[int]) -> float:
    """The rank balance: the busiest rank's count over the mean (1.0 even; 0 when nothing ran)."""
    total = sum(values)
    return max(values) * len(values) / total if total else 0.0


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p90/p99/mean/max (nearest rank); zeros when empty."""
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "mean": 0.0, "max": 0.0}
    ordered = np.sort(np.asarray(values))
    at = lambda q: float(ordered[min(len(ordered) - 1, max(0, int(np.ceil(q * len(ordered))) - 1))])  # noqa: E731
    return {
        "p50": at(0.5),
        "p90": at(0.9),
        "p99": at(0.99),
        "mean": float(ordered.mean()),
        "max": float(ordered[-1]),
    }


class Simulator:
    def __init__(
        self,
        limits: SchedulerLimits,
        cost: StepCostModel,
        overlap: bool = True,
        coordinator_s: float = 0.0,
        frontend_s: float = 0.0,
        frontend_token_s: float = 0.0,
        speculation: Speculation | None = None,
    ) -> None:
        if (speculation is None) != (limits.num_draft_tokens == 0):
            raise WorkloadError(
                "speculative decoding in the simulator needs both a Speculation (acceptance, draft cost) and "
                f"limits.num_draft_tokens > 0; got {speculation} and {limits.num_draft_tokens} draft token(s)"
            )
        if speculation is not None and overlap:
            raise WorkloadError(
                "speculative decoding runs its steps one at a time: simulate with overlap off"
            )
        self.speculation = speculation
        self.limits, self.cost, self.overlap, self.coordinator_s = limits, cost, overlap, coordinator_s
        self.frontend_s, self.frontend_token_s = frontend_s, frontend_token_s

    def run(self, workload: ClientModel, progress: Callable[[str], None] | None = None) -> SimResult:
        started = time.perf_counter()
        scheduler = Scheduler(self.limits, max_steps_in_flight=2 if self.overlap else 1)
        clients = workload.clients()
        sampling: dict[int, SamplingParams] = {}  # by max_tokens
        frontend = FrontEnd(self.frontend_s, self.frontend_token_s)
        # (send time, order, client), not yet at the front end, a heap: a client's next turn can be due
        # before later first sends; then (sent, reaches the scheduler, client), in order
        order = itertools.count()
        arrivals = [(at, next(order), client) for at, client in clients.first_sends()]
        heapq.heapify(arrivals)
        reaching: deque[tuple[float, float, int]] = deque()
        streams: dict[str, _Stream] = {}
        done: list[_Stream] = []
        sent = prompt_tokens_sent = 0
        series: dict[str, list[float]] = {
            k: [] for k in ("t", "step_s", "kind", "waiting", "running", "kv_usage", "preemptions")
        }
        launched: deque[tuple[list[StepPlan], float, float]] = deque()  # plans, start, end
        now = device_free = 0.0
        prompt_tokens = output_tokens = steps = 0
        next_report = max(1, workload.requests // 10)
        rng = np.random.default_rng(self.speculation.seed if self.speculation else 0)

        def send_due() -> None:
            nonlocal sent, prompt_tokens_sent
            while arrivals and arrivals[0][0] <= now:
                at, _, client = heapq.heappop(arrivals)
                reaching.append((at, frontend.request(at), client))
            while reaching and reaching[0][1] <= now:
                at, _, client = reaching.popleft()
                request_id = f"sim-{sent}"
                prompt, max_tokens = clients.prompt(client, sent)
                if max_tokens not in sampling:
                    sampling[max_tokens] = SamplingParams(
                        max_tokens=max_tokens, temperature=0.0, ignore_eos=True
                    )
                try:
                    scheduler.add(request_id, prompt, sampling[max_tokens], frozenset())
                except RequestRejected as e:
                    raise WorkloadError(f"the scheduler refuses the workload's requests: {e}") from None
                streams[request_id] = _Stream(at, client)
                sent += 1
                prompt_tokens_sent += len(prompt)

        def take(plans: list[StepPlan], start: float, end: float) -> None:
            nonlocal prompt_tokens, output_tokens
            results = [self._result(p, rng) for p in plans]
            for update in scheduler.update(results):
                stream = streams[update.request_id]
                delivered = frontend.token(end)
                stream.token_times.append(delivered)
                stream.token_ids.append(update.token_id)
                output_tokens += 1
                if update.finish_reason is not None:
                    done.append(streams.pop(update.request_id))
                    again = clients.answered(stream.client, stream.token_ids, delivered)
                    if again is not None:
                        heapq.heappush(arrivals, (again, next(order), stream.client))  # its next request
            if plans[0].kind == StepKind.PREFILL:
                prompt_tokens += sum(p.num_tokens for p in plans)
            series["t"].append(end)
            series["step_s"].append(end - start)
            series["kind"].append(float(plans[0].kind))
            series["waiting"].append(float(scheduler.num_waiting))
            series["running"].append(float(scheduler.num_running))
            series["kv_usage"].append(scheduler.kv_usage())
            series["preemptions"].append(float(scheduler.num_preemptions))

        while len(done) < workload.requests:
            send_due()
            plans = scheduler.schedule()
            if plans is not None:
                start = max(now, device_free)
                end = start + self.step_seconds(plans)
                device_free = end
                launched.append((plans, start, end))
                steps += 1
            if launched and (not self.overlap or plans is None or len(launched) == 2):
                plans_done, start, end = launched.popleft()
                now = max(now, end)
                take(plans_done, start, end)
                now += self.coordinator_s
            elif plans is None:
                upcoming = [
                    t
                    for t in (arrivals[0][0] if arrivals else None, reaching[0][1] if reaching else None)
                    if t is not None
                ]
                if not upcoming:
                    raise WorkloadError(
                        f"the simulation stalled with {len(done)}/{workload.requests} requests done and nothing "
                        "to run: the configuration cannot serve this workload (too few KV pages or slots?)"
                    )
                now = max(now, min(upcoming))
            if progress is not None and len(done) >= next_report:
                progress(
                    f"sim: {len(done)}/{workload.requests} requests done, {now:.1f} s simulated, "
                    f"{time.perf_counter() - started:.1f} s wall"
                )
                next_report += max(1, workload.requests // 10)
        ttft = [s.token_times[0] - s.arrival for s in done]
        itl = [float(g) for s in done for g in np.diff(s.token_times)]
        e2e = [s.token_times[-1] - s.arrival for s in done]
        return SimResult(
            workload=workload,
            makespan_s=max(s.token_times[-1] for s in done),
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
            ttft_s=ttft,
            itl_s=itl,
            e2e_s=e2e,
            series=_thin(series),
            steps=steps,
            preemptions=scheduler.num_preemptions,
            wall_s=time.perf_counter() - started,
            prompt_tokens_sent=prompt_tokens_sent,
            cached_tokens=scheduler.cache_hits,
            prefix_caching=self.limits.prefix_caching,
            admitted_by_rank=list(scheduler.admitted_by_rank),
        )

    def step_seconds(self, plans: list[StepPlan]) -> float:
        """A step's seconds: the cost model's, and the drafts' with speculative decoding."""
        seconds = self.cost.step_seconds(plans)
        if self.speculation is not None and any(p.num_seqs for p in plans):
            seconds += self.speculation.draft_s
        return seconds

    def _result(self, plan: StepPlan, rng: np.random.Generator) -> StepResult:
        """Made-up tokens for `plan`'s sampled rows (with speculation: accepted counts, drafts)."""
        ids = plan.sampled_ids
        spec = self.speculation
        if spec is None:
            return StepResult(plan.step_id, plan.rank, ids, np.ones(len(ids), np.int64))
        k = self.limits.num_draft_tokens
        if plan.kind == StepKind.DECODE:
            accepted = np.cumprod(rng.random((len(ids), k)) < spec.acceptance, axis=1).sum(axis=1)
            emitted: np.ndarray | None = 1 + accepted.astype(np.int64)
        else:
            emitted = None
        count = len(ids) if emitted is None else int(emitted.sum())
        return StepResult(
            plan.step_id,
            plan.rank,
            ids,
            np.ones(count, np.int64),
            num_emitted=emitted,
            draft_token_ids=np.ones((len(ids), k), np.int64),
        )


def _thin(series: dict[str, list[float]]) -> dict[str, list[float]]:
    n = len(series["t"])
    if n <= MAX_SERIES:
        return series
    keep = np.linspace(0, n - 1, MAX_SERIES).astype(int)
    return {k: [v[i] for i in keep] for k, v in series.items()}
