"""WorkerActor: the Ray actor around one rank's Worker.

It joins the group's torch.distributed process group (NCCL on GPU, gloo on CPU) at the address
rank 0 chose, then builds the Worker, whose MoE layers exchange tokens over that group. Every
collective has the group's timeout, so a rank whose peer died raises instead of waiting forever.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket

import torch
import torch.distributed as dist

from nmoe_serve.engine.plan import StepPlan, StepResult
from nmoe_serve.settings import EngineSettings
from nmoe_serve.topology import Topology
from nmoe_serve.worker.worker import Worker

log = logging.getLogger(__name__)


class WorkerActor:
    """Wrapped with ray.remote by the executor (so this module does not need Ray to import)."""

    def __init__(self, settings: EngineSettings, topology: Topology) -> None:
        self.settings, self.topology = settings, topology
        self.worker: Worker | None = None
        if settings.device == "cpu":
            torch.set_num_threads(1)  # 8 ranks share a few cores; more threads only contend
        logging.basicConfig(
            level=logging.INFO, format=f"%(asctime)s rank{topology.rank} %(name)s: %(message)s"
        )

    def rendezvous_address(self) -> tuple[str, int]:
        """An address on this actor's node with a free port, for the process group (rank 0 only)."""
        import ray

        host = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            return host, s.getsockname()[1]

    def start(self, host: str, port: int, timeout_s: float) -> int:
        """Join the process group and load the shard; returns this rank's KV page count."""
        backend = "nccl" if self.settings.device == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(0)  # Ray exposes the bundle's one GPU as device 0
        dist.init_process_group(
            backend,
            init_method=f"tcp://{host}:{port}",
            rank=self.topology.rank,
            world_size=self.topology.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        log.info(
            "joined %s group of %d at %s:%d (pid %d)",
            backend,
            self.topology.world_size,
            host,
            port,
            os.getpid(),
        )
        self.worker = self.make_worker()
        return self.worker.num_pages

    def make_worker(self) -> Worker:
        """This rank's Worker, built once the process group is up (subclasses may wrap it)."""
        return Worker(self.settings, self.topology)

    def execute(self, plan: StepPlan) -> StepResult:
        assert self.worker is not None, "start() first"
        return self.worker.execute(plan)

    def launch(self, plan: StepPlan) -> StepResult | None:
        """Start `plan`; the results of the step launched before it (Worker.launch)."""
        assert self.worker is not None, "start() first"
        return self.worker.launch(plan)

    def flush(self) -> StepResult | None:
        assert self.worker is not None, "start() first"
        return self.worker.flush()

    def idle_times(self) -> list[tuple[int, int, int, float]]:
        """The device's idle time before each recent step (Worker.idle_times), then cleared."""
        assert self.worker is not None, "start() first"
        return self.worker.idle_times()

    def inventory(self) -> dict[str, object]:
        assert self.worker is not None
        return self.worker.inventory()

    def stats(self) -> dict[str, float]:
        assert self.worker is not None
        return self.worker.stats()

    def pid(self) -> int:
        return os.getpid()
