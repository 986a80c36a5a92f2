"""Client models for the simulator: a closed loop of C clients (bench/latency.py's), or Poisson arrivals.

Closed loop: C requests start at time 0; whenever one ends, its client sends the next at once,
until `requests` have been sent. Poisson: requests arrive at `rate` per second, independently of
how the engine keeps up. Every request has P prompt tokens and generates exactly N (EOS ignored),
as bench/latency.py's do. Their prompts are distinct (first token differs): the prefix cache
finds nothing to share. sim/chat.py has a workload whose prompts share prefixes.

A client model (`ClientModel`) hands the simulator a fresh `Clients` per run: the first sends, the
prompt of each request as it reaches the scheduler, and when a client sends again after an answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


class WorkloadError(ValueError):
    """A workload that cannot be simulated; the message says what to change."""


class Clients(Protocol):
    """One run's clients; a client is an int, a request is sent by one."""

    def first_sends(self) -> list[tuple[float, int]]:
        """(send time, client) of the requests known up front, in time order."""
        ...

    def prompt(self, client: int, index: int) -> tuple[list[int], int]:
        """(prompt token ids, output tokens) of the `index`-th request to reach the scheduler, the client's."""
        ...

    def answered(self, client: int, output_token_ids: list[int], at: float) -> float | None:
        """The client's request ended with these tokens, streamed by `at`: when it sends its next
        (None: it sends no more)."""
        ...


class ClientModel(Protocol):
    @property
    def requests(self) -> int:
        """Requests sent in all."""
        ...

    def describe(self) -> str: ...

    def clients(self) -> Clients: ...


@dataclass(frozen=True)
class Workload:
    prompt_tokens: int  # P
    output_tokens: int  # N
    requests: int  # how many are sent in all
    concurrency: int | None = None  # C: a closed loop of C clients
    rate: float | None = None  # or Poisson arrivals, requests per second
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise WorkloadError(
                "give exactly one of --concurrency (closed loop) or --rate (Poisson arrivals)"
            )
        if self.concurrency is not None and self.concurrency < 1:
            raise WorkloadError(f"--concurrency must be at least 1, got {self.concurrency}")
        if self.rate is not None and not self.rate > 0:
            raise WorkloadError(f"--rate must be a positive number of requests per second, got {self.rate}")
        for name, value in (
            ("--prompt-tokens", self.prompt_tokens),
            ("--output-tokens", self.output_tokens),
            ("--requests", self.requests),
        ):
            if value < 1:
                raise WorkloadError(f"{name} must be at least 1, got {value}")

    @property
    def closed_loop(self) -> bool:
        return self.concurrency is not None

    def initial_arrivals(self) -> list[float]:
        """Arrival times known up front: C zeros (closed loop), or every Poisson arrival."""
        if self.concurrency is not None:
            return [0.0] * min(self.concurrency, self.requests)
        assert self.rate is not None
        gaps = np.random.default_rng(self.seed).exponential(1.0 / self.rate, self.requests)
        return np.cumsum(gaps).tolist()

    def clients(self) -> Clients:
        return _FixedClients(self)

    def describe(self) -> str:
        clients = (
            f"C={self.concurrency} (closed loop)" if self.closed_loop else f"Poisson {self.rate:g} req/s"
        )
        return f"{clients}, P={self.prompt_tokens}, N={self.output_tokens}, {self.requests} requests"


class _FixedClients:
    """Closed loop: C clients, each sending again at once until `requests` are sent; Poisson: one
    client per request."""

    def __init__(self, workload: Workload) -> None:
        self.workload = workload
        self.filler = [1] * (workload.prompt_tokens - 1)
        self.issued = 0

    def first_sends(self) -> list[tuple[float, int]]:
        sends = [(at, i) for i, at in enumerate(self.workload.initial_arrivals())]
        self.issued = len(sends)
        return sends

    def prompt(self, client: int, index: int) -> tuple[list[int], int]:
        return [index + 2, *self.filler], self.workload.output_tokens

    def answered(self, client: int, output_token_ids: list[int], at: float) -> float | None:
        if not self.workload.closed_loop or self.issued >= self.workload.requests:
            return None
        self.issued += 1
        return at
