"""MTP speculative decoding on the CPU, through the real engine at EP 1 (the scheduler, the worker, the
MTP drafter, the sampler's verify) on the tiny float32 checkpoint with its MTP layer.

- Greedy tokens with MTP equal those without it, with chunked prefill, preemption and the prefix
  cache in play, for k = 1, 2 and 3; logprobs come from the target model.
- After every step each decoding sequence's first draft equals a from-scratch reference: one
  prefill of the whole sequence through the target, then the MTP layer over it (so the MTP latents
  the drafter keeps across chunks, verify steps, rollbacks and preemptions are the right ones).
- Drafts right by construction are all accepted, wrong ones all rejected, a half-right one partly.
- Stop ids, max_tokens and stop strings end a request exactly where they do without MTP.
- Aborting frees every page; the config refuses what cannot work.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nmoe_serve.config import ConfigError, ServeConfig
from nmoe_serve.llm import LLM
from nmoe_serve.model.args import ModelArgs
from nmoe_serve.model.loader import load_checkpoint
from nmoe_serve.model.mtp import DeepseekV3WithMTP
from nmoe_serve.model.rope import RotaryEmbedding
from nmoe_serve.model.tiny import make_tiny_checkpoint
from nmoe_serve.sampling.params import SamplingParams
from nmoe_serve.worker.step_batch import build_step_batch
from tests.helpers import ManualPlans, resolve

OPTIONS = {
    "dtype": "float32",
    "device": "cpu",
    "max_seq_len": 160,
    "page_size": 8,
    "max_prefill_tokens": 24,  # prompts are chunked
    "max_num_seqs": 6,
    "overlap": False,
}


def llm(path: Path, drafts: int, **options) -> LLM:
    spec = {"speculative_method": "mtp", "num_draft_tokens": drafts} if drafts else {}
    return LLM(path, **{**OPTIONS, **spec, **options})


def workload(count: int = 10, seed: int = 0, vocab: int = 512):
    rng = np.random.default_rng(seed)
    shared = rng.integers(0, vocab, 20).tolist()
    prompts = []
    for i in range(count):
        head = shared if i % 3 == 0 else []
        prompts.append(head + rng.integers(0, vocab, int(rng.integers(1, 60))).tolist())
    params = [
        SamplingParams(max_tokens=int(rng.integers(5, 30)), ignore_eos=True, temperature=0.0) for _ in prompts
    ]
    return prompts, params


def tokens(engine: LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in engine.generate(prompts, params)]


@pytest.fixture(scope="module")
def plain_tokens(tiny_fp32: Path) -> list[list[int]]:
    engine = llm(tiny_fp32, 0, num_pages=24)
    try:
        return tokens(engine, *workload())
    finally:
        engine.shutdown()


@pytest.mark.parametrize("drafts", [1, 2, 3])
def test_greedy_tokens_with_mtp_equal_those_without(tiny_fp32: Path, plain_tokens, drafts: int) -> None:
    engine = llm(tiny_fp32, drafts, num_pages=24)  # 24 pages of 8: the workload preempts
    try:
        assert tokens(engine, *workload()) == plain_tokens
        scheduler = engine.engine.scheduler
        assert scheduler.num_preemptions > 0, "the workload is meant to preempt"
        assert scheduler.cache_hits > 0, "the workload is meant to hit the prefix cache"
        assert scheduler.num_drafted == drafts * scheduler.num_verified_seqs > 0
        assert 0 < scheduler.num_accepted < scheduler.num_drafted
        assert all(p.num_free == p.num_pages for p in scheduler.pools), "pages leaked"
    finally:
        engine.shutdown()


class MTPReference:
    """The first draft for a sequence, from scratch: one prefill of its tokens t_0..t_{L-1} through
    the target on fresh pages, then the MTP layer over positions 0..L-1 with t_1..t_L."""

    def __init__(self, path: Path) -> None:
        self.args = ModelArgs.from_checkpoint(path)
        self.model = DeepseekV3WithMTP(self.args, torch.float32, torch.device("cpu"))
        load_checkpoint(self.model, path)
        self.model.eval()
        self.rope = RotaryEmbedding(self.args.rope, torch.device("cpu"))

    @torch.inference_mode()
    def first_draft(self, known: list[int]) -> int:
        page_size, length = 8, len(known) - 1
        plans = ManualPlans(page_size, 64)
        plan = plans.prefill([("s", known[:-1])])
        caches = [torch.zeros(65, page_size, self.args.kv_cache_dim) for _ in range(self.args.n_layers + 1)]
        input_ids, batch = build_step_batch(plan, page_size, self.rope, torch.device("cpu"))
        hidden = self.model(input_ids, batch, caches[:-1])
        next_ids = torch.tensor(known[1:], dtype=torch.int64)
        normed = self.model.mtp.predict(hidden, next_ids, batch, caches[-1])
        assert normed.shape[0] == length
        return int(self.model.mtp.compute_logits(normed[-1:]).argmax())


@pytest.mark.parametrize("drafts", [1, 2])
def test_each_steps_first_draft_equals_a_from_scratch_mtp_reference(tiny_fp32: Path, drafts: int) -> None:
    reference = MTPReference(tiny_fp32)
    engine = llm(tiny_fp32, drafts, num_pages=16, max_num_seqs=4, max_seq_len=128)
    core = engine.engine
    prompts, params = workload(count=5, seed=3)
    for i, (prompt, sampling) in enumerate(zip(prompts, params, strict=True)):
        core.add_request(f"r{i}", prompt, sampling)
    checked = 0
    try:
        while core.has_work():
            core.step()
            table = core.scheduler.table
            for slot in table.decodable().tolist():
                request = table.occupant[slot]
                assert request is not None
                known = request.all_token_ids.tolist()
                assert int(table.drafts[slot, 0]) == reference.first_draft(known), request.request_id
                checked += 1
        assert checked > 20 and core.scheduler.num_preemptions > 0
    finally:
        engine.shutdown()


def test_right_drafts_are_accepted_wrong_ones_rejected_and_half_right_ones_in_part(
    tiny_fp32: Path, plain_tokens
) -> None:
    prompts, _ = workload()
    prompt, want = prompts[1], plain_tokens[1]
    engine = llm(tiny_fp32, 2, num_pages=64)
    core = engine.engine
    core.add_request("r", prompt, SamplingParams(max_tokens=len(want), ignore_eos=True, temperature=0.0))
    got: list[int] = []
    try:
        while not got:  # the prefill (possibly chunked) ends with the first token
            got.extend(u.token_id for u in core.step())
        table, slot = core.scheduler.table, core.scheduler.requests["r"].slot
        for case in ("right", "wrong", "half", "right"):
            n = len(got)
            truth = want[n : n + 2]
            if len(truth) < 2:
                break
            wrong = [(t + 1) % 512 for t in truth]
            table.drafts[slot] = {"right": truth, "wrong": wrong, "half": [truth[0], wrong[1]]}[case]
            step = [u.token_id for u in core.step()]
            assert step == want[n : n + {"right": 3, "wrong": 1, "half": 2}[case]], case
            got.extend(step)
        while core.has_work():
            got.extend(u.token_id for u in core.step())
        assert got == want
    finally:
        engine.shutdown()


def test_stops_and_max_tokens_end_exactly_where_they_do_without_mtp(tiny_fp32: Path, plain_tokens) -> None:
    prompts, _ = workload()
    long = SamplingParams(max_tokens=30, ignore_eos=True, temperature=0.0)
    plain = llm(tiny_fp32, 0, num_pages=64)
    spec = llm(tiny_fp32, 3, num_pages=64)
    try:
        reference = tokens(plain, prompts[:4], [long] * 4)
        stops = [
            SamplingParams(max_tokens=30, ignore_eos=True, temperature=0.0, stop_token_ids=[r[7]])
            for r in reference
        ]
        for max_tokens in (1, 2, 5):
            short = [SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)] * 4
            assert tokens(spec, prompts[:4], short) == [r[:max_tokens] for r in reference]
        got = spec.generate(prompts[:4], stops)
        want = plain.generate(prompts[:4], stops)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
        assert [o.outputs[0].finish_reason for o in got] == ["stop"] * 4
        # stop strings: the text of a few tokens in, cut there by the front end
        texts = [o.outputs[0].text for o in plain.generate(prompts[:4], [long] * 4)]
        strings = [
            SamplingParams(max_tokens=30, ignore_eos=True, temperature=0.0, stop=[t[6:9]])
            for t in texts
            if len(t) > 9
        ]
        if strings:
            n = len(strings)
            got_text = [o.outputs[0].text for o in spec.generate(prompts[:n], strings)]
            want_text = [o.outputs[0].text for o in plain.generate(prompts[:n], strings)]
            assert got_text == want_text
    finally:
        plain.shutdown()
        spec.shutdown()


def test_logprobs_with_mtp_are_the_target_models(tiny_fp32: Path) -> None:
    prompts, _ = workload(count=3, seed=5)
    asking = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.0, logprobs=3)
    plain, spec = llm(tiny_fp32, 0, num_pages=64), llm(tiny_fp32, 2, num_pages=64)
    try:
        want, got = plain.generate(prompts, asking), spec.generate(prompts, asking)
        for w, g in zip(want, got, strict=True):
            assert g.outputs[0].token_ids == w.outputs[0].token_ids
            for a, b in zip(w.outputs[0].logprobs, g.outputs[0].logprobs, strict=True):
                assert a.keys() == b.keys()
                for token in a:
                    assert b[token].logprob == pytest.approx(a[token].logprob, abs=1e-4)
    finally:
        plain.shutdown()
        spec.shutdown()


def test_seeded_sampling_with_mtp_gives_the_tokens_it_gives_without(tiny_fp32: Path) -> None:
    """A seeded request draws the noise of output position n from (seed, n) whichever way the
    token is sampled, and the verify step accepts a draft only where the target's own sample equals
    it: so with MTP the seeded tokens are those without it."""
    prompts, _ = workload(count=4, seed=6)
    seeded = [
        SamplingParams(max_tokens=20, ignore_eos=True, temperature=0.8, top_p=0.9, seed=s) for s in range(4)
    ]
    plain, spec = llm(tiny_fp32, 0, num_pages=64), llm(tiny_fp32, 2, num_pages=64)
    try:
        assert tokens(spec, prompts, seeded) == tokens(plain, prompts, seeded)
    finally:
        plain.shutdown()
        spec.shutdown()


def test_aborting_mid_stream_frees_every_page(tiny_fp32: Path) -> None:
    engine = llm(tiny_fp32, 2, num_pages=64)
    core = engine.engine
    prompts, _ = workload(count=4, seed=7)
    for i, prompt in enumerate(prompts):
        core.add_request(f"r{i}", prompt, SamplingParams(max_tokens=40, ignore_eos=True, temperature=0.0))
    try:
        for _ in range(6):
            core.step()
        for i in range(4):
            core.abort(f"r{i}")
        while core.has_work():
            core.step()
        assert all(p.num_free == p.num_pages for p in core.scheduler.pools)
        assert len(core.executor.worker.sampler) == 0  # type: ignore[attr-defined]
    finally:
        engine.shutdown()


def test_the_config_refuses_mtp_without_the_layer_or_with_overlapped_steps(tmp_path: Path) -> None:
    bare = make_tiny_checkpoint(tmp_path / "no-mtp", overrides={"num_nextn_predict_layers": 0})
    config = ServeConfig.from_dict(
        {"model": {"path": str(bare)}, "speculative": {"method": "mtp"}, "scheduler": {"overlap": False}}
    )
    with pytest.raises(ConfigError, match="no multi-token-prediction layer"):
        resolve(config)
    with pytest.raises(ConfigError, match=r"scheduler\.overlap = false"):
        ServeConfig.from_dict({"model": {"path": str(bare)}, "speculative": {"method": "mtp"}})
    with pytest.raises(ConfigError, match="num_draft_tokens"):
        ServeConfig.from_dict(
            {"model": {"path": str(bare)}, "speculative": {"method": "mtp", "num_draft_tokens": 9}}
        )
