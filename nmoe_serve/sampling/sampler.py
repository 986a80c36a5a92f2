"""Sampler: one token per request from a batch of logits, on the worker that owns the requests.

Step plans send a request's SamplingParams once, so the Sampler keeps per-request state: the
params, how many tokens the request has generated, and, for requests with penalties, a row of
output-token counts and a prompt-token mask on the device. One `Sampler.sample` call runs:

    raw logits ─▶ penalties ─▶ min_tokens mask ─┬▶ greedy: argmax
                                                └▶ / temperature ─▶ top_k ─▶ top_p ─▶ min_p ─▶ race

The race is the exponential race (Gumbel-max): argmax(logit_i - log q_i) with q_i ~ Exponential(1),
the same token as argmax(p_i / q_i), so one draw of V numbers decides a row. Logprobs are of the raw
logits, before penalties, temperature and truncation.

Randomness: a request with a seed draws the noise for output position n from a generator seeded
with a 64-bit mix of (seed, n). Its tokens therefore do not depend on the other rows of the batch,
their order, or whether the request was preempted and re-added with its output so far. Requests
without a seed share one generator of the Sampler.

Shapes: the legend in docs/ARCHITECTURE.md: B rows in the batch (the sampled sequences), V, and
the subsets B_p rows with penalties, B_t rows that sample at a temperature, B_l rows that ask for
logprobs, B_c rows of the penalty tables; k top logprobs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from nmoe_serve.sampling.params import SamplingParams

# Temperatures below this sample greedily: dividing logits by them overflows float32, and the
# distribution is an argmax anyway.
GREEDY_TEMPERATURE = 1e-5

_MASK64 = (1 << 64) - 1


@dataclass
class SamplerOutput:
    """The tokens of one `Sampler.sample` call, as numpy arrays (cheap to send between processes).

    Attributes:
        token_ids: [B] int64, the sampled token of each row.
        logprobs: [B] float32, the sampled token's log-probability under the raw logits; NaN in rows
            that asked for no logprobs. None when no row asked.
        top_token_ids: [B, k] int64, each row's most likely tokens, most likely first. k is the
            largest `logprobs` asked in the batch (capped at the vocabulary size); entries past a
            row's own count (`num_top`) are -1. None when no row asked.
        top_logprobs: [B, k] float32, their log-probabilities; NaN past a row's own count.
        num_top: [B] int32, how many top entries each row asked for; -1 where it asked for none.
    """

    token_ids: np.ndarray
    logprobs: np.ndarray | None = None
    top_token_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None
    num_top: np.ndarray | None = None


@dataclass
class DeviceSample:
    """The tokens of one `Sampler.sample_on_device` call, still on the device.

    Attributes:
        token_ids: [B] int64 on the device.
        logprobs: [B_l] float32, the sampled token's log-probability in the rows that asked
            (`asking`); None when none asked. top_logprobs, top_token_ids: [B_l, k] on the device.
        num_top: [B] int32 on the host, as in SamplerOutput; None when no row asked.
    """

    token_ids: torch.Tensor
    logprobs: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None
    top_token_ids: torch.Tensor | None = None
    num_top: np.ndarray | None = None
    asking: np.ndarray | None = None
    _host: tuple[torch.Tensor, ...] | None = None
    _copied: torch.cuda.Event | None = None

    def start_copy(self) -> None:
        """Start copying the tensors to pinned host memory (CUDA) without waiting; `to_host` waits."""
        if self.token_ids.device.type != "cuda":
            return
        tensors = [
            t for t in (self.token_ids, self.logprobs, self.top_logprobs, self.top_token_ids) if t is not None
        ]
        host = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors)
        for h, t in zip(host, tensors, strict=True):
            h.copy_(t, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        self._host = host

    def to_host(self) -> SamplerOutput:
        """The same as numpy arrays (waits for the device)."""
        if self._host is not None:
            assert self._copied is not None
            self._copied.synchronize()
            token_ids, *rest = self._host
        else:
            token_ids = self.token_ids.cpu()
            rest = [t.cpu() for t in (self.logprobs, self.top_logprobs, self.top_token_ids) if t is not None]
        output = SamplerOutput(token_ids=token_ids.numpy().astype(np.int64, copy=False))
        if self.num_top is None:
            return output
        assert self.asking is not None
        logprobs, top_logprobs, top_ids = (t.numpy() for t in rest)
        rows, k, num_top, asking = len(self.num_top), top_logprobs.shape[1], self.num_top, self.asking
        output.num_top = num_top
        output.logprobs = np.full(rows, np.nan, dtype=np.float32)
        output.logprobs[asking] = logprobs
        output.top_token_ids = np.full((rows, k), -1, dtype=np.int64)
        output.top_logprobs = np.full((rows, k), np.nan, dtype=np.float32)
        meaningful = np.arange(k)[None, :] < num_top[asking][:, None]  # [B_l, k]
        output.top_token_ids[asking] = np.where(meaningful, top_ids, -1)
        output.top_logprobs[asking] = np.where(meaningful, top_logprobs, np.nan)
        return output


@dataclass
class VerifyOutput:
    """The tokens of one `Sampler.verify_on_device` call, as numpy arrays (q = 1 + Kd positions).

    Attributes:
        token_ids: [B, q] int64, the target's token at each position; row b's first
            num_emitted[b] are its emitted tokens, the rest mean nothing.
        num_emitted: [B] int64, 1 + the drafts accepted.
        logprobs, top_token_ids, top_logprobs, num_top: as SamplerOutput's, with a position axis
            ([B, q], [B, q, k], [B, q, k], [B, q]); None when no row asked.
    """

    token_ids: np.ndarray
    num_emitted: np.ndarray
    logprobs: np.ndarray | None = None
    top_token_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None
    num_top: np.ndarray | None = None


@dataclass
class DeviceVerify:
    """The tokens of one `Sampler.verify_on_device` call, on the device: token_ids [B, q] int64,
    num_emitted [B] int64; the logprobs of the rows that asked as one DeviceSample over their
    B_l·q position rows (`positions`)."""

    token_ids: torch.Tensor
    num_emitted: torch.Tensor
    positions: DeviceSample | None = None
    _host: tuple[torch.Tensor, torch.Tensor] | None = None
    _copied: torch.cuda.Event | None = None

    def start_copy(self) -> None:
        """Start copying the tokens (and logprobs) to pinned host memory (CUDA); `to_host` waits."""
        if self.positions is not None:
            self.positions.start_copy()
        if self.token_ids.device.type != "cuda":
            return
        host = tuple(
            torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in (self.token_ids, self.num_emitted)
        )
        host[0].copy_(self.token_ids, non_blocking=True)
        host[1].copy_(self.num_emitted, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        self._host = (host[0], host[1])

    def to_host(self) -> VerifyOutput:
        """The same as numpy arrays (waits for the device)."""
        if self._host is not None:
            assert self._copied is not None
            self._copied.synchronize()
            token_ids, num_emitted = self._host
        else:
            token_ids, num_emitted = self.token_ids.cpu(), self.num_emitted.cpu()
        b, q = token_ids.shape
        out = VerifyOutput(token_ids.numpy().astype(np.int64), num_emitted.numpy().astype(np.int64))
        if self.positions is not None:
            rows = self.positions.to_host()  # [B·q] position rows
            assert rows.logprobs is not None and rows.top_token_ids is not None
            assert rows.top_logprobs is not None and rows.num_top is not None
            k = rows.top_token_ids.shape[1]
            out.logprobs = rows.logprobs.reshape(b, q)
            out.top_token_ids = rows.top_token_ids.reshape(b, q, k)
            out.top_logprobs = rows.top_logprobs.reshape(b, q, k)
            out.num_top = rows.num_top.reshape(b, q)
        return out


@dataclass
class _Request:
    params: SamplingParams
    num_outputs: int
    slot: int | None  # row in the penalty tables; None when the request has no penalties
    min_tokens_ids: tuple[int, ...]  # stop_token_ids inside the vocabulary, masked until min_tokens
    verifying: bool = False  # a verify's tokens are out, its `advance` not yet called

    @property
    def greedy(self) -> bool:
        return self.params.temperature < GREEDY_TEMPERATURE

    @property
    def min_tokens_pending(self) -> bool:
        return self.num_outputs < self.params.min_tokens


class _PenaltyTables:
    """Penalty state on the device, one row (slot) per request with penalties.

    counts[slot, t] is how often token t occurs in the request's output; prompt_mask[slot, t] whether
    it occurs in the prompt. Slots are reused after release; the tables double when full and take
    no memory until the first request with penalties arrives.
    """

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.counts = torch.zeros(0, vocab_size, dtype=torch.int32, device=device)  # [B_c, V]
        self.prompt_mask = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)  # [B_c, V]
        self._free: list[int] = []

    def acquire(self, prompt_token_ids: torch.Tensor, output_token_ids: torch.Tensor) -> int:
        if not self._free:
            self._grow()
        slot = self._free.pop()
        counts = torch.bincount(output_token_ids.to(self.device), minlength=self.vocab_size)
        self.counts[slot] = counts.to(torch.int32)
        self.prompt_mask[slot] = False
        self.prompt_mask[slot, prompt_token_ids.to(self.device)] = True
        return slot

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def record(self, slots: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Count one more occurrence of token_ids[i] in the output of slots[i]."""
        ones = torch.ones_like(slots, dtype=torch.int32)
        self.counts.index_put_((slots, token_ids), ones, accumulate=True)

    def _grow(self) -> None:
        old = self.counts.shape[0]
        new = max(8, 2 * old)
        counts = torch.zeros(new, self.vocab_size, dtype=torch.int32, device=self.device)
        prompt_mask = torch.zeros(new, self.vocab_size, dtype=torch.bool, device=self.device)
        counts[:old] = self.counts
        prompt_mask[:old] = self.prompt_mask
        self.counts, self.prompt_mask = counts, prompt_mask
        self._free.extend(range(new - 1, old - 1, -1))  # pop() hands out the lowest slot first


class Sampler:
    """Samples the next token of every request a worker owns, keeping each request's state.

    Args:
        vocab_size: V, the width of the logits rows.
        device: where the logits live; state and randomness stay there.
        seed: seed of the generator shared by requests without their own seed; None draws one
            from system entropy.
    """

    def __init__(self, vocab_size: int, device: torch.device | str, seed: int | None = None) -> None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"Sampler vocab_size={vocab_size!r} is invalid: it must be an integer >= 1")
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._requests: dict[str, _Request] = {}
        self._tables = _PenaltyTables(vocab_size, self.device)
        self._shared_generator = torch.Generator(device=self.device)
        if seed is None:
            self._shared_generator.seed()
        else:
            self._shared_generator.manual_seed(seed)
        self._seeded_generator = torch.Generator(device=self.device)  # re-seeded for every seeded row

    def __len__(self) -> int:
        return len(self._requests)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._requests

    def add_request(
        self,
        request_id: str,
        params: SamplingParams,
        prompt_token_ids: Sequence[int],
        output_token_ids: Sequence[int] = (),
    ) -> None:
        """Start tracking a request.

        Args:
            request_id: unique among the requests this Sampler tracks.
            params: how to sample it.
            prompt_token_ids: the prompt only (the repetition penalty covers it).
            output_token_ids: tokens the request already generated, when a preempted request is
                re-admitted; its penalties and seeded randomness continue as if it never left.
        """
        if request_id in self._requests:
            raise ValueError(
                f"Sampler.add_request: request {request_id!r} is already tracked; "
                "remove it before adding it again"
            )
        if not isinstance(params, SamplingParams):
            raise TypeError(
                f"Sampler.add_request: params of request {request_id!r} must be SamplingParams, "
                f"got {type(params).__name__}"
            )
        prompt = self._token_tensor(request_id, "prompt_token_ids", prompt_token_ids)
        output = self._token_tensor(request_id, "output_token_ids", output_token_ids)
        has_penalties = (
            params.repetition_penalty != 1.0
            or params.frequency_penalty != 0.0
            or params.presence_penalty != 0.0
        )
        slot = self._tables.acquire(prompt, output) if has_penalties else None
        self._requests[request_id] = _Request(
            params=params,
            num_outputs=output.numel(),
            slot=slot,
            min_tokens_ids=tuple(t for t in params.stop_token_ids if t < self.vocab_size),
        )

    def remove_request(self, request_id: str) -> None:
        """Stop tracking a request (finished, cancelled or preempted) and free its state."""
        request = self._lookup(request_id, "remove_request")
        if request.slot is not None:
            self._tables.release(request.slot)
        del self._requests[request_id]

    def num_outputs(self, request_id: str) -> int:
        """How many tokens the request has generated (re-admitted outputs included)."""
        return self._lookup(request_id, "num_outputs").num_outputs

    def sample(
        self, request_ids: Sequence[str], logits: torch.Tensor, eos_token_id: int | None
    ) -> SamplerOutput:
        """Sample one token per row and append it to that request's output.

        Args:
            request_ids: the request of each row, each at most once.
            logits: [B, V] float logits, on the Sampler's device; not modified.
            eos_token_id: the model's end-of-sequence token, masked while min_tokens is pending.
        """
        return self.sample_on_device(request_ids, logits, eos_token_id).to_host()

    def sample_on_device(
        self, request_ids: Sequence[str], logits: torch.Tensor, eos_token_id: int | None
    ) -> DeviceSample:
        """`sample`, with the tokens (and logprobs) left on the device: the owner rank feeds them to
        its next decode step without waiting for them; `DeviceSample.to_host()` brings them over.
        An all-greedy batch without penalties or logprobs makes no host round trip."""
        requests = self._batch(request_ids, logits, eos_token_id)
        if all(
            r.greedy and r.slot is None and r.params.logprobs is None and not r.min_tokens_pending
            for r in requests
        ):
            token_ids = logits.argmax(dim=-1)  # [B]: the all-greedy batch is one argmax
        else:
            token_ids = self._sample_general(requests, logits, eos_token_id)
        sample = DeviceSample(token_ids)
        if any(r.params.logprobs is not None for r in requests):
            self._logprobs(sample, requests, logits, token_ids)
        self._record(requests, token_ids)
        return sample

    def verify_on_device(
        self,
        request_ids: Sequence[str],
        logits: torch.Tensor,
        draft_token_ids: torch.Tensor,
        eos_token_id: int | None,
    ) -> DeviceVerify:
        """Verify Kd greedy drafts per request (speculative decoding): sample the target's token at
        each of the q = 1 + Kd positions, position j as if the first j drafts had been emitted (its
        seed's noise for output num_outputs + j, its min_tokens mask, its penalty counts), and
        accept the drafts up to the first that differs from the target's token there; the emitted
        tokens are the target's up to and including that one (1 to q per request).

        Drafts are deterministic (an argmax), so this is rejection sampling with a one-hot draft
        distribution: a draft d is accepted with probability p(d), and on rejection the token is
        drawn from p restricted to the other tokens; every emitted token is a sample of the target's
        distribution given the real prefix, and the output distribution equals sampling without
        drafts. A seeded request draws the same noise at each output position either way, so its
        tokens do not depend on speculation (up to the logits' rounding).

        Args:
            request_ids: [B] the requests, each at most once.
            logits: [B·q, V] float, row b·q + j = position j of request b.
            draft_token_ids: [B, Kd] int64 on the Sampler's device.
            eos_token_id: masked while min_tokens is pending.

        The penalty counts record the emitted tokens on the device; num_outputs moves only with
        `advance`, once the emitted counts are on the host (a request cannot be sampled again before).
        """
        b = len(request_ids)
        if draft_token_ids.dim() != 2 or draft_token_ids.shape[0] != b or draft_token_ids.shape[1] < 1:
            raise ValueError(
                f"Sampler.verify_on_device: draft_token_ids have shape {tuple(draft_token_ids.shape)}, expected "
                f"[{b}, k] with k >= 1 (one row of drafts per request)"
            )
        q = 1 + int(draft_token_ids.shape[1])
        if logits.dim() != 2 or logits.shape[0] != b * q:
            raise ValueError(
                f"Sampler.verify_on_device: logits have shape {tuple(logits.shape)}, expected [{b * q}, "
                f"{self.vocab_size}] ({b} requests x {q} positions)"
            )
        if draft_token_ids.numel() and (
            int(draft_token_ids.min()) < 0 or int(draft_token_ids.max()) >= self.vocab_size
        ):
            raise ValueError(
                f"Sampler.verify_on_device: draft ids outside the vocabulary [0, {self.vocab_size}): min "
                f"{int(draft_token_ids.min())}, max {int(draft_token_ids.max())}"
            )
        requests = self._batch(request_ids, logits.view(b, q, logits.shape[1])[:, 0], eos_token_id)
        rows = [r for r in requests for _ in range(q)]
        ahead = list(range(q)) * b
        if all(
            r.greedy and r.slot is None and r.params.logprobs is None and not r.min_tokens_pending
            for r in requests
        ):
            token_ids = logits.argmax(dim=-1)  # [B·q]: the all-greedy batch is one argmax
        else:
            token_ids = self._sample_general(rows, logits, eos_token_id, ahead, draft_token_ids)
        tokens = token_ids.view(b, q)
        matches = (tokens[:, :-1] == draft_token_ids).to(torch.int64).cumprod(dim=1)  # [B, Kd]
        verify = DeviceVerify(tokens, 1 + matches.sum(dim=1))
        if any(r.params.logprobs is not None for r in requests):
            verify.positions = DeviceSample(token_ids)
            self._logprobs(verify.positions, rows, logits, token_ids)
        penalized = [i for i, r in enumerate(requests) if r.slot is not None]
        if penalized:
            index = self._index(penalized)
            emitted = torch.arange(q, device=self.device)[None, :] < verify.num_emitted[index][:, None]
            slots = self._slots([requests[i] for i in penalized])[:, None].expand(-1, q)
            self._tables.counts.index_put_(
                (slots.reshape(-1), tokens[index].reshape(-1)),
                emitted.reshape(-1).to(torch.int32),
                accumulate=True,
            )
        for r in requests:
            r.verifying = True
        return verify

    def advance(self, request_ids: Sequence[str], num_emitted: np.ndarray) -> None:
        """After a verify: each request's output count moves by its emitted tokens [B] (host)."""
        if len(num_emitted) != len(request_ids):
            raise ValueError(
                f"Sampler.advance: {len(num_emitted)} emitted counts for {len(request_ids)} requests"
            )
        for rid, n in zip(request_ids, np.asarray(num_emitted).tolist(), strict=True):
            r = self._lookup(rid, "advance")
            if not r.verifying:
                raise RuntimeError(f"Sampler.advance: request {rid!r} has no verify waiting to be advanced")
            r.num_outputs += int(n)
            r.verifying = False

    def _sample_general(
        self,
        requests: list[_Request],
        logits: torch.Tensor,
        eos_token_id: int | None,
        ahead: list[int] | None = None,
        drafts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One token per row. ahead[i] (verify steps): row i samples its request's output
        `num_outputs + ahead[i]`, as if its first ahead[i] drafts (`drafts` [B_r, Kd], a row per
        request, in the order the requests first appear) had been emitted: its seed's noise, its
        min_tokens mask and its penalty counts are those of that position."""
        offsets = ahead or [0] * len(requests)
        x = logits.float()  # [B, V]
        if x.data_ptr() == logits.data_ptr():
            x = x.clone()  # the caller's logits stay untouched

        penalized = [i for i, r in enumerate(requests) if r.slot is not None]
        if penalized:
            rows = self._index(penalized)
            slots = self._slots([requests[i] for i in penalized])
            counts = self._tables.counts[slots]  # [B_p, V]
            if drafts is not None and any(offsets[i] for i in penalized):
                counts = counts + self._draft_counts(requests, penalized, offsets, drafts)
            x[rows] = apply_penalties(
                x[rows],
                counts,
                self._tables.prompt_mask[slots],
                repetition=self._floats([requests[i].params.repetition_penalty for i in penalized]),
                frequency=self._floats([requests[i].params.frequency_penalty for i in penalized]),
                presence=self._floats([requests[i].params.presence_penalty for i in penalized]),
            )

        blocked_rows: list[int] = []
        blocked_ids: list[int] = []
        for i, r in enumerate(requests):
            if r.num_outputs + offsets[i] < r.params.min_tokens:
                ids = r.min_tokens_ids if eos_token_id is None else (eos_token_id, *r.min_tokens_ids)
                blocked_rows.extend([i] * len(ids))
                blocked_ids.extend(ids)
        if blocked_rows:
            x[self._index(blocked_rows), self._index(blocked_ids)] = -torch.inf

        token_ids = torch.empty(len(requests), dtype=torch.int64, device=x.device)  # [B]
        greedy = [i for i, r in enumerate(requests) if r.greedy]
        if greedy:
            rows = self._index(greedy)
            token_ids[rows] = x[rows].argmax(dim=-1)
        sampled = [i for i, r in enumerate(requests) if not r.greedy]
        if sampled:
            rows = self._index(sampled)
            token_ids[rows] = self._sample_at_temperature(
                x[rows], [requests[i] for i in sampled], [offsets[i] for i in sampled]
            )
        return token_ids

    def _draft_counts(
        self, requests: list[_Request], penalized: list[int], offsets: list[int], drafts: torch.Tensor
    ) -> torch.Tensor:
        """[B_p, V] int32: how often each token occurs among the drafts before each penalized row's
        position (verify rows: request b's rows follow each other, ahead 0..Kd)."""
        first: dict[int, int] = {}  # id(request) -> its row in `drafts`
        for r in requests:
            first.setdefault(id(r), len(first))
        extra = torch.zeros(len(penalized), self.vocab_size, dtype=torch.int32, device=self.device)
        for n, i in enumerate(penalized):
            ahead = offsets[i]
            if ahead:
                row = drafts[first[id(requests[i])], :ahead]
                extra[n].index_add_(0, row, torch.ones_like(row, dtype=torch.int32))
        return extra

    def _sample_at_temperature(
        self, logits: torch.Tensor, requests: list[_Request], offsets: list[int]
    ) -> torch.Tensor:
        params = [r.params for r in requests]
        x = logits / self._floats([p.temperature for p in params])[:, None]  # [B_t, V]
        if any(p.top_k > 0 for p in params) or any(p.top_p < 1.0 for p in params):
            top_k = [p.top_k if p.top_k > 0 else self.vocab_size for p in params]
            top_p = [p.top_p if p.top_p < 1.0 else torch.inf for p in params]
            x = apply_top_k_top_p(x, self._index(top_k), self._floats(top_p))
        if any(p.min_p > 0.0 for p in params):
            x = apply_min_p(x, self._floats([p.min_p for p in params]))
        noise = self._exponential_noise(requests, offsets)  # [B_t, V]
        return (x - noise.log()).argmax(dim=-1)

    def _exponential_noise(self, requests: list[_Request], offsets: list[int]) -> torch.Tensor:
        noise = torch.empty(len(requests), self.vocab_size, device=self.device)  # [B_t, V]
        if any(r.params.seed is None for r in requests):
            noise.exponential_(generator=self._shared_generator)
        for i, (r, ahead) in enumerate(zip(requests, offsets, strict=True)):
            if r.params.seed is not None:
                self._seeded_generator.manual_seed(position_seed(r.params.seed, r.num_outputs + ahead))
                noise[i].exponential_(generator=self._seeded_generator)
        # An exact 0 would make -log(q) infinite, and a masked token (-inf) NaN.
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)

    def _logprobs(
        self, sample: DeviceSample, requests: list[_Request], logits: torch.Tensor, token_ids: torch.Tensor
    ) -> None:
        num_top = np.array(
            [-1 if r.params.logprobs is None else min(r.params.logprobs, self.vocab_size) for r in requests],
            dtype=np.int32,
        )
        asking = np.flatnonzero(num_top >= 0)
        rows = self._index(asking.tolist())
        logprobs = logits[rows].float().log_softmax(dim=-1)  # [B_l, V]
        sample.logprobs = logprobs.gather(1, token_ids[rows][:, None])[:, 0]  # [B_l]
        sample.top_logprobs, sample.top_token_ids = logprobs.topk(int(num_top.max()), dim=-1, sorted=True)
        sample.num_top, sample.asking = num_top, asking

    def _record(self, requests: list[_Request], token_ids: torch.Tensor) -> None:
        penalized = [i for i, r in enumerate(requests) if r.slot is not None]
        if penalized:
            slots = self._slots([requests[i] for i in penalized])
            self._tables.record(slots, token_ids[self._index(penalized)])
        for r in requests:
            r.num_outputs += 1

    def _batch(
        self, request_ids: Sequence[str], logits: torch.Tensor, eos_token_id: int | None
    ) -> list[_Request]:
        want = (len(request_ids), self.vocab_size)
        if logits.dim() != 2 or tuple(logits.shape) != want:
            raise ValueError(
                f"Sampler.sample: logits have shape {tuple(logits.shape)}, expected {want} "
                "(one row per request id, vocab_size columns)"
            )
        if not logits.is_floating_point():
            raise ValueError(f"Sampler.sample: logits must be a float tensor, got {logits.dtype}")
        if logits.device.type != self.device.type or (
            self.device.index is not None and logits.device.index != self.device.index
        ):
            raise ValueError(
                f"Sampler.sample: logits are on {logits.device} but the Sampler is on {self.device}"
            )
        if eos_token_id is not None and not 0 <= eos_token_id < self.vocab_size:
            raise ValueError(
                f"Sampler.sample: eos_token_id={eos_token_id} is outside the vocabulary [0, {self.vocab_size})"
            )
        if len(set(request_ids)) != len(request_ids):
            twice = sorted(rid for rid, n in Counter(request_ids).items() if n > 1)
            raise ValueError(f"Sampler.sample: request ids appear more than once in the batch: {twice}")
        requests = [self._lookup(rid, "sample") for rid in request_ids]
        waiting = [rid for rid, r in zip(request_ids, requests, strict=True) if r.verifying]
        if waiting:
            raise RuntimeError(
                f"Sampler: requests {waiting[:4]} have a verify whose emitted counts were not passed to "
                "advance(): call advance() first"
            )
        return requests

    def _lookup(self, request_id: str, caller: str) -> _Request:
        try:
            return self._requests[request_id]
        except KeyError:
            raise KeyError(
                f"Sampler.{caller}: unknown request {request_id!r}; add_request it first "
                "(or it was already removed)"
            ) from None

    def _token_tensor(self, request_id: str, name: str, token_ids: Sequence[int]) -> torch.Tensor:
        ids = torch.as_tensor(token_ids, dtype=torch.int64).reshape(-1).cpu()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(
                f"Sampler.add_request: {name} of request {request_id!r} hold ids outside the "
                f"vocabulary [0, {self.vocab_size}): min {int(ids.min())}, max {int(ids.max())}"
            )
        return ids

    def _index(self, values: Sequence[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    def _slots(self, requests: list[_Request]) -> torch.Tensor:
        return self._index([r.slot for r in requests if r.slot is not None])

    def _floats(self, values: Sequence[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.device)


def apply_penalties(
    logits: torch.Tensor,
    counts: torch.Tensor,
    prompt_mask: torch.Tensor,
    repetition: torch.Tensor,
    frequency: torch.Tensor,
    presence: torch.Tensor,
) -> torch.Tensor:
    """Repetition, then frequency and presence penalties, as SamplingParams documents them.

    Args:
        logits: [B_p, V] float32.
        counts: [B_p, V] occurrences of each token in the output.
        prompt_mask: [B_p, V] bool, tokens in the prompt.
        repetition, frequency, presence: [B_p] per-row penalties.
    """
    in_output = counts > 0  # [B_p, V]
    seen = in_output | prompt_mask  # [B_p, V]
    rep = repetition[:, None]  # [B_p, 1]
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - frequency[:, None] * counts - presence[:, None] * in_output


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (-inf) all but each row's top_k tokens, then all but the smallest set reaching top_p.

    Args:
        logits: [B_t, V] float32, already divided by the temperature.
        top_k: [B_t] int64, V to keep every token.
        top_p: [B_t] float32, inf to keep every token. The most likely token is always kept.
    """
    # stable: ties keep vocabulary order, so the kept set never depends on the rest of the batch
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # [B_t, V]
    rank = torch.arange(logits.shape[-1], device=logits.device)  # [V]
    sorted_logits = sorted_logits.masked_fill(rank[None, :] >= top_k[:, None], -torch.inf)
    probs = sorted_logits.softmax(dim=-1)  # [B_t, V]
    mass_before = probs.cumsum(dim=-1) - probs  # [B_t, V], 0 for the most likely token
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p[:, None], -torch.inf)
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below min_p times the most likely token's.

    p_i / p_max = exp(l_i - l_max) does not change when the rows are renormalised, so this works in
    logit space, after any truncation.

    Args:
        logits: [B_t, V] float32, already divided by the temperature.
        min_p: [B_t] float32, 0 to keep every token.
    """
    threshold = logits.amax(dim=-1, keepdim=True) + min_p[:, None].log()  # [B_t, 1], -inf where min_p=0
    return logits.masked_fill(logits < threshold, -torch.inf)


def position_seed(seed: int, position: int) -> int:
    """The 64-bit generator seed for output position `position` of a request seeded with `seed`.

    SplitMix64 applied twice, so that nearby seeds and positions give unrelated streams.
    """
    return _splitmix64(_splitmix64(seed) + position)


def _splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)
