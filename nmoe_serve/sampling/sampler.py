"""Sampler: one token per request from a batch of logits, on the worker that owns the requests.

Step plans send a request's SamplingParams once, so the Sampler keeps per-request state: the
params, how many tokens the request has generated, and, for requests with penalties, a row of
output-token counts and a prompt-token mask on the device. One `Sampler.sample` call runs:

    raw logits ─▶ penalties ─▶ min_tokens mask ─┬▶ greedy: argmax
                                                └▶ / temperature ─▶ top_k ─▶ top_p ─▶ min_p ─▶ race

The race is the exponential race (Gumbel-max): argmax(logit_i - log q_i) with q_i ~ Exponential(1),
the same token as argmax(p_i / q_i), so one draw of V numbers decides a row. Logprobs are of the raw
logits, before penalties, temperature and truncation.

Speculative decoding (MTP): `Sampler.verify_on_device` takes the target's logits at J positions
of each request, J - 1 greedy drafts d_1..d_{J-1} after its last output. Position j is sampled with
the state `sample` would use had d_1..d_j already been emitted (output position num_outputs + j:
its seeded noise, min_tokens, penalties that count the drafts), and draft d_{j+1} is accepted iff
that sample equals it. Drafts being deterministic, this is rejection sampling: the tokens emitted
(the samples up to and including the first that rejects) have exactly the non-speculative
distribution, and with a seed they are the tokens of sequential `sample` calls.

Randomness: a request with a seed draws the noise for output position n from a generator seeded
with a 64-bit mix of (seed, n). Its tokens therefore do not depend on the other rows of the batch,
their order, or whether the request was preempted and re-added with its output so far. Requests
without a seed share one generator of the Sampler.

Shapes: the legend in docs/ARCHITECTURE.md: B rows in the batch (the sampled sequences), V, and
the subsets B_p rows with penalties, B_t rows that sample at a temperature, B_l rows that ask for
logprobs, B_c rows of the penalty tables; k top logprobs; J positions a verify samples per
request (its drafts + 1), R = B·J rows of a verify's logits (R_x: a subset of them, named by x).
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
        self._host, self._copied = _start_copy(self._tensors())

    def _tensors(self) -> list[torch.Tensor]:
        return [
            t for t in (self.token_ids, self.logprobs, self.top_logprobs, self.top_token_ids) if t is not None
        ]

    def to_host(self) -> SamplerOutput:
        """The same as numpy arrays (waits for the device)."""
        token_ids, *rest = _host_arrays(self._tensors(), self._host, self._copied)
        output = SamplerOutput(token_ids=token_ids.astype(np.int64, copy=False))
        if self.num_top is None:
            return output
        assert self.asking is not None
        logprobs, top_logprobs, top_ids = rest
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
    """The tokens of one `Sampler.verify_on_device` call, as numpy arrays.

    Attributes:
        token_ids: [B, J] int64, the target's sample at each position. A row's first num_emitted
            entries are its emitted tokens; the entries after them are meaningless.
        num_emitted: [B] int64, 1 + the number of leading drafts accepted, in [1, J].
        logprobs: [B, J] float32, each position's sampled token's log-probability under the raw
            logits; NaN in rows that asked for none. None when no row asked.
        top_token_ids: [B, J, k] int64, each position's most likely tokens, as in SamplerOutput
            (-1 past a row's `num_top`). top_logprobs: [B, J, k] float32 (NaN past it).
        num_top: [B] int32, as in SamplerOutput.
    Entries at positions past a row's num_emitted are meaningless in every array.
    """

    token_ids: np.ndarray
    num_emitted: np.ndarray
    logprobs: np.ndarray | None = None
    top_token_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None
    num_top: np.ndarray | None = None


@dataclass
class DeviceVerify:
    """The tokens of one `Sampler.verify_on_device` call, still on the device.

    Attributes:
        token_ids: [B, J] int64 on the device, as in VerifyOutput.
        num_emitted: [B] int64 on the device, as in VerifyOutput.
        drafts_in_vocab: [B] bool on the device, whether every draft of the row is a token id;
            `to_host` refuses the verify when one is not (checked there to keep the device's
            work free of host round trips).
        logprobs: [B_l, J] float32 in the rows that asked (`asking`); None when none asked.
            top_logprobs, top_token_ids: [B_l, J, k] on the device.
        num_top: [B] int32 on the host, as in SamplerOutput; None when no row asked.
    """

    token_ids: torch.Tensor
    num_emitted: torch.Tensor
    drafts_in_vocab: torch.Tensor
    logprobs: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None
    top_token_ids: torch.Tensor | None = None
    num_top: np.ndarray | None = None
    asking: np.ndarray | None = None
    _host: tuple[torch.Tensor, ...] | None = None
    _copied: torch.cuda.Event | None = None

    def start_copy(self) -> None:
        """Start copying the tensors to pinned host memory (CUDA) without waiting; `to_host` waits."""
        self._host, self._copied = _start_copy(self._tensors())

    def _tensors(self) -> list[torch.Tensor]:
        tensors = (self.token_ids, self.num_emitted, self.drafts_in_vocab)
        return [t for t in (*tensors, self.logprobs, self.top_logprobs, self.top_token_ids) if t is not None]

    def to_host(self) -> VerifyOutput:
        """The same as numpy arrays (waits for the device).

        Raises:
            ValueError: a draft id was outside the vocabulary: a bug of the drafter; the verify's
                requests can then only be removed.
        """
        token_ids, num_emitted, in_vocab, *rest = _host_arrays(self._tensors(), self._host, self._copied)
        if not in_vocab.all():
            raise ValueError(
                "Sampler.verify_on_device: draft_token_ids of batch rows "
                f"{np.flatnonzero(~in_vocab).tolist()} hold ids outside the vocabulary; "
                "drafts must be token ids of the target's vocabulary"
            )
        output = VerifyOutput(
            token_ids=token_ids.astype(np.int64, copy=False),
            num_emitted=num_emitted.astype(np.int64, copy=False),
        )
        if self.num_top is None:
            return output
        assert self.asking is not None
        logprobs, top_logprobs, top_ids = rest
        (rows, width), k = token_ids.shape, top_logprobs.shape[-1]
        num_top, asking = self.num_top, self.asking
        output.num_top = num_top
        output.logprobs = np.full((rows, width), np.nan, dtype=np.float32)
        output.logprobs[asking] = logprobs
        output.top_token_ids = np.full((rows, width, k), -1, dtype=np.int64)
        output.top_logprobs = np.full((rows, width, k), np.nan, dtype=np.float32)
        meaningful = np.arange(k)[None, None, :] < num_top[asking][:, None, None]  # [B_l, 1, k]
        output.top_token_ids[asking] = np.where(meaningful, top_ids, -1)
        output.top_logprobs[asking] = np.where(meaningful, top_logprobs, np.nan)
        return output


def _start_copy(
    tensors: list[torch.Tensor],
) -> tuple[tuple[torch.Tensor, ...] | None, torch.cuda.Event | None]:
    """Pinned host copies of CUDA tensors, started without waiting, and the event that marks them
    done; (None, None) for tensors elsewhere, which `_host_arrays` copies then."""
    if not tensors or tensors[0].device.type != "cuda":
        return None, None
    host = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors)
    for h, t in zip(host, tensors, strict=True):
        h.copy_(t, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return host, copied


def _host_arrays(
    tensors: list[torch.Tensor], host: tuple[torch.Tensor, ...] | None, copied: torch.cuda.Event | None
) -> list[np.ndarray]:
    """The tensors as numpy arrays: the started copy once it is done, else copied now."""
    if host is None:
        return [t.cpu().numpy() for t in tensors]
    assert copied is not None
    copied.synchronize()
    return [h.numpy() for h in host]


@dataclass
class _Request:
    params: SamplingParams
    num_outputs: int
    slot: int | None  # row in the penalty tables; None when the request has no penalties
    min_tokens_ids: tuple[int, ...]  # stop_token_ids inside the vocabulary, masked until min_tokens
    verify_width: int | None = None  # J of a verify not yet advanced; None when there is none

    @property
    def greedy(self) -> bool:
        return self.params.temperature < GREEDY_TEMPERATURE

    @property
    def min_tokens_pending(self) -> bool:
        return self.num_outputs < self.params.min_tokens

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing to apply first and nothing to report: its token is the argmax."""
        return (
            self.greedy and self.slot is None and self.params.logprobs is None and not self.min_tokens_pending
        )


@dataclass(frozen=True)
class _Row:
    """One row of logits to sample: a request at one of its output positions (num_outputs for
    `sample`, num_outputs + j at position j of a verify)."""

    request: _Request
    position: int

    @property
    def min_tokens_pending(self) -> bool:
        return self.position < self.request.params.min_tokens


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

    def record(self, slots: torch.Tensor, token_ids: torch.Tensor, times: torch.Tensor) -> None:
        """Count times[i] (int32) more occurrences of token_ids[i] in the output of slots[i]."""
        self.counts.index_put_((slots, token_ids), times, accumulate=True)

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
        requests = self._batch(request_ids, logits, eos_token_id, "sample")
        if all(r.plain_greedy for r in requests):
            token_ids = logits.argmax(dim=-1)  # [B]: the all-greedy batch is one argmax
        else:
            rows = [_Row(r, r.num_outputs) for r in requests]
            slots = self._slots(requests)
            token_ids = self._sample_rows(rows, logits, eos_token_id, self._tables.counts[slots])
        sample = DeviceSample(token_ids)
        if any(r.params.logprobs is not None for r in requests):
            num_top, asking, logprobs, top_logprobs, top_ids = self._logprobs(requests, logits, token_ids, 1)
            sample.logprobs, sample.top_logprobs, sample.top_token_ids = logprobs, top_logprobs, top_ids
            sample.num_top, sample.asking = num_top, asking
        penalized = [i for i, r in enumerate(requests) if r.slot is not None]
        if penalized:
            sampled = token_ids[self._index(penalized)]  # [B_p]
            self._tables.record(self._slots(requests), sampled, torch.ones_like(sampled, dtype=torch.int32))
        for r in requests:
            r.num_outputs += 1
        return sample

    def verify_on_device(
        self,
        request_ids: Sequence[str],
        logits: torch.Tensor,
        draft_token_ids: torch.Tensor,
        eos_token_id: int | None,
    ) -> DeviceVerify:
        """Verify greedy drafts: sample the target at every position and emit the samples up to the
        first one that differs from its draft (rejection sampling for deterministic drafts).

        Position j of a request (j = 0..J-1) is sampled as `sample` would sample its output number
        num_outputs + j had drafts d_1..d_j been emitted before: seeded rows draw that position's
        noise, min_tokens masks EOS and stop ids while num_outputs + j < min_tokens, and penalties
        count d_1..d_j as outputs. Draft d_{j+1} is accepted iff the sample at j equals it, so a
        request emits its samples 0..m, m the number of leading accepted drafts (1 to J tokens),
        each distributed exactly as without speculation.

        The penalty counts on the device take the emitted tokens at once (no host round trip), but
        num_outputs stays until `advance` is called with the verify's num_emitted; until then the
        requests refuse another `sample` or verify. An all-greedy batch without penalties, logprobs
        or min_tokens pending makes no host round trip: argmax, compare, cumulative product.

        Args:
            request_ids: the B requests, each at most once.
            logits: [R, V] float, R = B·J, row b·J + j the target's logits at position j of
                request b; on the Sampler's device; not modified.
            draft_token_ids: [B, J-1] int64 on the Sampler's device, J - 1 >= 1 drafts per request,
                ids of the vocabulary (checked by `DeviceVerify.to_host`).
            eos_token_id: the model's end-of-sequence token, masked while min_tokens is pending.
        """
        if (
            draft_token_ids.dim() != 2
            or draft_token_ids.shape[0] != len(request_ids)
            or draft_token_ids.shape[1] < 1
        ):
            raise ValueError(
                f"Sampler.verify_on_device: draft_token_ids have shape {tuple(draft_token_ids.shape)}, "
                f"expected ({len(request_ids)}, J-1) with J-1 >= 1 drafts per request id"
            )
        if draft_token_ids.dtype != torch.int64 or draft_token_ids.device != logits.device:
            raise ValueError(
                f"Sampler.verify_on_device: draft_token_ids must be int64 on the logits' device "
                f"{logits.device}, got {draft_token_ids.dtype} on {draft_token_ids.device}"
            )
        width = draft_token_ids.shape[1] + 1
        requests = self._batch(request_ids, logits, eos_token_id, "verify_on_device", width)
        if all(r.plain_greedy for r in requests):
            token_ids = logits.argmax(dim=-1)  # [R]
        else:
            rows = [_Row(r, r.num_outputs + j) for r in requests for j in range(width)]
            counts = self._draft_counts(requests, draft_token_ids)  # [R_p, V]
            token_ids = self._sample_rows(rows, logits, eos_token_id, counts)  # [R]
        token_ids = token_ids.view(len(requests), width)  # [B, J]
        accepted = (token_ids[:, :-1] == draft_token_ids).cumprod(dim=1)  # [B, J-1], 1 while all accepted
        num_emitted = 1 + accepted.sum(dim=1)  # [B]
        in_vocab = ((draft_token_ids >= 0) & (draft_token_ids < self.vocab_size)).all(dim=1)  # [B]
        verify = DeviceVerify(token_ids, num_emitted, in_vocab)
        if any(r.params.logprobs is not None for r in requests):
            num_top, asking, logprobs, top_logprobs, top_ids = self._logprobs(
                requests, logits, token_ids.reshape(-1), width
            )
            verify.logprobs = logprobs.view(len(asking), width)
            verify.top_logprobs = top_logprobs.view(len(asking), width, -1)
            verify.top_token_ids = top_ids.view(len(asking), width, -1)
            verify.num_top, verify.asking = num_top, asking
        penalized = [b for b, r in enumerate(requests) if r.slot is not None]
        if penalized:
            rows_p = self._index(penalized)
            positions = torch.arange(width, device=self.device)  # [J]
            emitted = (positions[None, :] < num_emitted[rows_p][:, None]).to(torch.int32)  # [B_p, J]
            slots = self._slots(requests).repeat_interleave(width)  # [R_p]
            self._tables.record(slots, token_ids[rows_p].reshape(-1), emitted.reshape(-1))
        for r in requests:
            r.verify_width = width
        return verify

    def advance(self, request_ids: Sequence[str], num_emitted: np.ndarray) -> None:
        """Count a verify's emitted tokens as outputs, once they reached the host.

        Args:
            request_ids: requests whose last verify is not yet advanced, each at most once.
            num_emitted: [B] integers, the verify's `VerifyOutput.num_emitted` of each request (the
                penalty counts on the device already hold exactly that many tokens).
        """
        counts = np.asarray(num_emitted)
        if counts.shape != (len(request_ids),) or not np.issubdtype(counts.dtype, np.integer):
            raise ValueError(
                f"Sampler.advance: num_emitted must be [{len(request_ids)}] integers (one per request id), "
                f"got shape {counts.shape} of {counts.dtype}"
            )
        self._check_distinct(request_ids, "advance")
        requests = [self._lookup(rid, "advance") for rid in request_ids]
        for rid, r, n in zip(request_ids, requests, counts.tolist(), strict=True):
            if r.verify_width is None:
                raise ValueError(
                    f"Sampler.advance: request {rid!r} has no verify to advance; "
                    "advance once after each verify_on_device"
                )
            if not 1 <= n <= r.verify_width:
                raise ValueError(
                    f"Sampler.advance: num_emitted={n} of request {rid!r} is outside [1, {r.verify_width}] "
                    "(its verify's J); pass the verify's own num_emitted"
                )
        for r, n in zip(requests, counts.tolist(), strict=True):
            r.num_outputs += n
            r.verify_width = None

    def _sample_rows(
        self, rows: list[_Row], logits: torch.Tensor, eos_token_id: int | None, counts: torch.Tensor
    ) -> torch.Tensor:
        """One token per row of logits [R, V] (R rows, a request at a position); counts [R_p, V]:
        the output counts of the rows with penalties, in row order."""
        x = logits.float()  # [R, V]
        if x.data_ptr() == logits.data_ptr():
            x = x.clone()  # the caller's logits stay untouched

        penalized = [i for i, row in enumerate(rows) if row.request.slot is not None]
        if penalized:
            indices = self._index(penalized)
            requests = [rows[i].request for i in penalized]
            x[indices] = apply_penalties(
                x[indices],
                counts,
                self._tables.prompt_mask[self._slots(requests)],
                repetition=self._floats([r.params.repetition_penalty for r in requests]),
                frequency=self._floats([r.params.frequency_penalty for r in requests]),
                presence=self._floats([r.params.presence_penalty for r in requests]),
            )

        blocked_rows: list[int] = []
        blocked_ids: list[int] = []
        for i, row in enumerate(rows):
            if row.min_tokens_pending:
                stop_ids = row.request.min_tokens_ids
                ids = stop_ids if eos_token_id is None else (eos_token_id, *stop_ids)
                blocked_rows.extend([i] * len(ids))
                blocked_ids.extend(ids)
        if blocked_rows:
            x[self._index(blocked_rows), self._index(blocked_ids)] = -torch.inf

        token_ids = torch.empty(len(rows), dtype=torch.int64, device=x.device)  # [R]
        greedy = [i for i, row in enumerate(rows) if row.request.greedy]
        if greedy:
            indices = self._index(greedy)
            token_ids[indices] = x[indices].argmax(dim=-1)
        sampled = [i for i, row in enumerate(rows) if not row.request.greedy]
        if sampled:
            indices = self._index(sampled)
            token_ids[indices] = self._sample_at_temperature(x[indices], [rows[i] for i in sampled])
        return token_ids

    def _sample_at_temperature(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        params = [row.request.params for row in rows]
        x = logits / self._floats([p.temperature for p in params])[:, None]  # [R_t, V]
        if any(p.top_k > 0 for p in params) or any(p.top_p < 1.0 for p in params):
            top_k = [p.top_k if p.top_k > 0 else self.vocab_size for p in params]
            top_p = [p.top_p if p.top_p < 1.0 else torch.inf for p in params]
            x = apply_top_k_top_p(x, self._index(top_k), self._floats(top_p))
        if any(p.min_p > 0.0 for p in params):
            x = apply_min_p(x, self._floats([p.min_p for p in params]))
        noise = self._exponential_noise(rows)  # [R_t, V]
        return (x - noise.log()).argmax(dim=-1)

    def _exponential_noise(self, rows: list[_Row]) -> torch.Tensor:
        noise = torch.empty(len(rows), self.vocab_size, device=self.device)  # [R_t, V]
        if any(row.request.params.seed is None for row in rows):
            noise.exponential_(generator=self._shared_generator)
        for i, row in enumerate(rows):
            seed = row.request.params.seed
            if seed is not None:
                self._seeded_generator.manual_seed(position_seed(seed, row.position))
                noise[i].exponential_(generator=self._seeded_generator)
        # An exact 0 would make -log(q) infinite, and a masked token (-inf) NaN.
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)

    def _draft_counts(self, requests: list[_Request], draft_token_ids: torch.Tensor) -> torch.Tensor:
        """[R_p, V] output counts at every position of the requests with penalties: the table's
        counts plus drafts d_1..d_j at position j. An id outside the vocabulary counts nowhere (the
        positions after it are never emitted)."""
        penalized = [b for b, r in enumerate(requests) if r.slot is not None]
        drafts = draft_token_ids[self._index(penalized)]  # [B_p, J-1]
        num_rows, num_drafts = drafts.shape
        valid = ((drafts >= 0) & (drafts < self.vocab_size)).to(torch.int32)  # [B_p, J-1]
        added = torch.zeros(num_rows, num_drafts + 1, self.vocab_size, dtype=torch.int32, device=self.device)
        added[:, 1:].scatter_(-1, drafts.clamp(0, self.vocab_size - 1)[..., None], valid[..., None])
        counts = self._tables.counts[self._slots(requests)][:, None] + added.cumsum(dim=1, dtype=torch.int32)
        return counts.reshape(-1, self.vocab_size)  # [B_p, J, V] -> [R_p, V]

    def _logprobs(
        self, requests: list[_Request], logits: torch.Tensor, token_ids: torch.Tensor, width: int
    ) -> tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw logprobs of the requests that ask, at each of their `width` rows of logits [B·width, V]:
        (num_top [B], asking [B_l], chosen [B_l·width], top logprobs and ids [B_l·width, k])."""
        num_top = np.array(
            [-1 if r.params.logprobs is None else min(r.params.logprobs, self.vocab_size) for r in requests],
            dtype=np.int32,
        )
        asking = np.flatnonzero(num_top >= 0)
        rows = self._index((asking[:, None] * width + np.arange(width)[None, :]).reshape(-1).tolist())
        logprobs = logits[rows].float().log_softmax(dim=-1)  # [B_l·width, V]
        chosen = logprobs.gather(1, token_ids[rows][:, None])[:, 0]  # [B_l·width]
        top_logprobs, top_ids = logprobs.topk(int(num_top.max()), dim=-1, sorted=True)
        return num_top, asking, chosen, top_logprobs, top_ids

    def _batch(
        self,
        request_ids: Sequence[str],
        logits: torch.Tensor,
        eos_token_id: int | None,
        caller: str,
        width: int = 1,
    ) -> list[_Request]:
        want = (len(request_ids) * width, self.vocab_size)
        if logits.dim() != 2 or tuple(logits.shape) != want:
            per_id = "one row per request id" if width == 1 else f"J={width} rows per request id"
            raise ValueError(
                f"Sampler.{caller}: logits have shape {tuple(logits.shape)}, expected {want} "
                f"({per_id}, vocab_size columns)"
            )
        if not logits.is_floating_point():
            raise ValueError(f"Sampler.{caller}: logits must be a float tensor, got {logits.dtype}")
        if logits.device.type != self.device.type or (
            self.device.index is not None and logits.device.index != self.device.index
        ):
            raise ValueError(
                f"Sampler.{caller}: logits are on {logits.device} but the Sampler is on {self.device}"
            )
        if eos_token_id is not None and not 0 <= eos_token_id < self.vocab_size:
            raise ValueError(
                f"Sampler.{caller}: eos_token_id={eos_token_id} is outside the vocabulary [0, {self.vocab_size})"
            )
        self._check_distinct(request_ids, caller)
        requests = [self._lookup(rid, caller) for rid in request_ids]
        for rid, r in zip(request_ids, requests, strict=True):
            if r.verify_width is not None:
                raise ValueError(
                    f"Sampler.{caller}: request {rid!r} has a verify not yet advanced; call "
                    "Sampler.advance with that verify's num_emitted first"
                )
        return requests

    def _check_distinct(self, request_ids: Sequence[str], caller: str) -> None:
        if len(set(request_ids)) != len(request_ids):
            twice = sorted(rid for rid, n in Counter(request_ids).items() if n > 1)
            raise ValueError(f"Sampler.{caller}: request ids appear more than once in the batch: {twice}")

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
