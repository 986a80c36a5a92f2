"""Test helpers: hand-made step plans for driving a Worker without the scheduler, and settings."""

from __future__ import annotations

import random

import numpy as np

from nmoe_serve.config import ServeConfig
from nmoe_serve.engine.plan import StepKind, StepPlan
from nmoe_serve.settings import EngineSettings, resolve_settings


class ManualPlans:
    """Builds StepPlans for sequences whose pages are taken from a shuffled pool."""

    def __init__(self, page_size: int, num_pages: int, seed: int = 0) -> None:
        self.page_size = page_size
        self.free = list(range(num_pages))
        random.Random(seed).shuffle(self.free)
        self.pages: dict[str, list[int]] = {}
        self.lengths: dict[str, int] = {}
        self.step_id = 0

    def prefill(self, chunks: list[tuple[str, list[int]]], sample: list[bool] | None = None) -> StepPlan:
        return self._plan(StepKind.PREFILL, chunks, sample)

    def decode(self, tokens: list[tuple[str, int]]) -> StepPlan:
        return self._plan(StepKind.DECODE, [(s, [t]) for s, t in tokens], None)

    def _plan(
        self, kind: StepKind, chunks: list[tuple[str, list[int]]], sample: list[bool] | None
    ) -> StepPlan:
        context = []
        for seq, tokens in chunks:
            length = self.lengths.get(seq, 0) + len(tokens)
            pages = self.pages.setdefault(seq, [])
            while len(pages) * self.page_size < length:
                pages.append(self.free.pop())
            self.lengths[seq] = length
            context.append(length)
        width = max((len(self.pages[s]) for s, _ in chunks), default=1)
        table = np.full((len(chunks), width), -1, np.int32)
        for i, (seq, _) in enumerate(chunks):
            table[i, : len(self.pages[seq])] = self.pages[seq]
        plan = StepPlan(
            step_id=self.step_id,
            kind=kind,
            rank=0,
            released=(),
            new_requests=(),
            request_ids=tuple(s for s, _ in chunks),
            query_lens=np.array([len(t) for _, t in chunks], np.int32),
            context_lens=np.array(context, np.int32),
            token_ids=np.array([t for _, ts in chunks for t in ts], np.int64),
            page_table=table,
            sample=np.array(sample if sample is not None else [True] * len(chunks), bool),
        )
        self.step_id += 1
        return plan


def resolve(config: ServeConfig) -> EngineSettings:
    """resolve_settings for a process whose ranks run here: CUDA where torch sees it."""
    import torch

    return resolve_settings(config, cuda_available=torch.cuda.is_available())
