"""The engine is torch-free control, and the HTTP replica runs without torch: both import and run
in a process where `import torch` fails."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCK_TORCH = "import sys\nsys.modules['torch'] = None  # any import of torch now raises ImportError\n"


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_coordinator_serves_without_torch() -> None:
    """The scheduler, the engine core and the coordinator loop over an executor written here."""
    run = run_without_torch(
        """
        import asyncio
        import numpy as np
        from nmoe_serve.engine.coordinator import Coordinator
        from nmoe_serve.engine.core import CoreSettings
        from nmoe_serve.engine.plan import StepResult
        from nmoe_serve.sampling.params import SamplingParams

        class CountingRanks:
            name, num_ranks, pages_per_rank, restarts = "counting", 2, 64, 0
            def execute(self, plans):
                out = []
                for p in plans:
                    ids = tuple(r for r, s in zip(p.request_ids, p.sample) if s)
                    out.append(StepResult(p.step_id, p.rank, ids, np.full(len(ids), 7, np.int64)))
                return out
            async def execute_async(self, plans):
                return self.execute(plans)
            def restart(self): pass
            def worker_stats(self): return [{}, {}]
            def shutdown(self): pass

        settings = CoreSettings(256, 16, 8, 64, 4, 0.0, eos_token_ids=(1,))
        coordinator = Coordinator(settings, CountingRanks(), group="no-torch")

        async def main():
            tokens = []
            async for updates in coordinator.generate("r", [3, 4, 5], SamplingParams(max_tokens=5)):
                tokens += [u.token_id for u in updates]
            await coordinator.wait_idle()
            return tokens

        assert asyncio.run(main()) == [7] * 5
        assert "torch" not in {m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}
        """
    )
    assert run.returncode == 0, run.stderr[-3000:]


def test_the_http_replica_and_a_groups_coordinator_import_without_torch() -> None:
    run = run_without_torch(
        """
        import nmoe_serve.serve.ingress
        import nmoe_serve.serve.coordinator_deployment
        import nmoe_serve.frontend.frontend
        """
    )
    assert run.returncode == 0, run.stderr[-3000:]


def test_the_simulator_runs_without_torch() -> None:
    run = run_without_torch(
        """
        from nmoe_serve.engine.scheduler import SchedulerLimits
        from nmoe_serve.sim.cost_model import StepCostModel
        from nmoe_serve.sim.simulator import Simulator
        from nmoe_serve.sim.workload import Workload

        costs = {
            "decode": {"step": 0.05, "seqs": 0.0, "context_tokens": 0.0},
            "prefill": {"step": 0.2, "tokens": 0.0, "attention_pairs": 0.0, "context_tokens": 0.0},
        }
        sim = Simulator(SchedulerLimits(2, 64, 16, 256, 4, 256, 2, 0), StepCostModel(costs, "t", "d"))
        result = sim.run(Workload(prompt_tokens=20, output_tokens=4, requests=6, concurrency=3))
        assert len(result.ttft_s) == 6
        assert "torch" not in {m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}
        """
    )
    assert run.returncode == 0, run.stderr[-3000:]
