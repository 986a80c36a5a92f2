"""Our DeepSeek-V3 against transformers' DeepseekV3ForCausalLM on tiny random checkpoints.

Every attention path is compared: batched prefill (all positions), chunked prefill continuing
from cached pages, absorbed-MLA decode, and greedy generation through the whole engine.

Tolerance: logits must agree to 1e-4 (absolute and relative) in float32. Both models compute
the same mathematics with different association orders (absorbed vs expanded attention, batched
vs per-sequence matmuls, fused vs per-expert routing), which in float32 leaves rounding-level
differences (measured: about 3e-6 on logits of magnitude up to ~5). A real semantic error (a
wrong rope layout, mask, scale or routing choice) moves logits by 1e-2 or more, so 1e-4 keeps a
30x margin over rounding while failing on any such error. Greedy tokens must be identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nmoe_serve.config import ServeConfig
from nmoe_serve.model.tiny import make_tiny_checkpoint
from nmoe_serve.sampling.params import SamplingParams
from nmoe_serve.topology import Topology
from nmoe_serve.worker.worker import Worker
from tests.helpers import ManualPlans, resolve

transformers = pytest.importorskip("transformers")

TOL = {"atol": 1e-4, "rtol": 1e-4}
PAGE_SIZE = 8
NUM_PAGES = 256

CONFIGS = {
    # q_lora, YaRN (mscale == mscale_all_dim), 4 groups choose 2, one dense layer
    "default": {},
    "no-q-lora": {"q_lora_rank": None},
    # two dense layers, one expert group, plain RoPE
    "two-dense-one-group-plain-rope": {
        "first_k_dense_replace": 2,
        "n_group": 1,
        "topk_group": 1,
        "rope_scaling": None,
    },
    # 8 groups of 2 choose 3, top-6, YaRN with mscale != mscale_all_dim (cos/sin and softmax both rescaled)
    "eight-groups-yarn-mscale": {
        "n_group": 8,
        "topk_group": 3,
        "num_experts_per_tok": 6,
        "max_position_embeddings": 4096,
        "rope_scaling": {
            "type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 512,
            "beta_fast": 16,
            "beta_slow": 2,
            "mscale": 0.707,
            "mscale_all_dim": 1.0,
        },
    },
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def oracle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    name = request.param
    path = make_tiny_checkpoint(
        tmp_path_factory.mktemp(f"oracle-{name}"), seed=7, overrides=CONFIGS[name], dtype=torch.float32
    )
    ref = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32)
    ref.eval()
    return name, path, ref


def make_worker(path: Path) -> Worker:
    config = ServeConfig.from_dict(
        {
            "model": {"path": str(path), "dtype": "float32", "max_seq_len": 1024},
            "cache": {"page_size": PAGE_SIZE, "num_pages": NUM_PAGES},
            "device": {"kind": "cpu"},
        }
    )
    return Worker(resolve(config), Topology())


def prompts(lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 496, (n,), generator=g).tolist() for n in lengths]


def reference_logits(ref, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([tokens])).logits[0].float()


def test_checkpoint_is_what_the_config_says(oracle) -> None:
    name, path, ref = oracle
    written = json.loads((path / "config.json").read_text())
    for key, value in CONFIGS[name].items():
        assert written[key] == value
    if CONFIGS[name].get("rope_scaling", {}) is not None:
        assert ref.config.rope_parameters["rope_type"] == "yarn"


def test_batched_prefill_matches_at_every_position(oracle) -> None:
    _, path, ref = oracle
    worker = make_worker(path)
    seqs = prompts([37, 5, 64], seed=1)
    plans = ManualPlans(PAGE_SIZE, NUM_PAGES, seed=1)
    logits = worker.logits_for(plans.prefill([(f"s{i}", s) for i, s in enumerate(seqs)]), all_positions=True)
    start = 0
    for seq in seqs:
        torch.testing.assert_close(logits[start : start + len(seq)], reference_logits(ref, seq), **TOL)
        start += len(seq)


def test_chunked_prefill_continues_from_cached_pages(oracle) -> None:
    _, path, ref = oracle
    worker = make_worker(path)
    long, short = prompts([64, 30], seed=2)
    plans = ManualPlans(PAGE_SIZE, NUM_PAGES, seed=2)
    steps = [
        plans.prefill([("long", long[:20]), ("short", short)], sample=[False, True]),
        plans.prefill([("long", long[20:21])], sample=[False]),
        plans.prefill([("long", long[21:])]),
    ]
    logits = [worker.logits_for(p, all_positions=True) for p in steps]
    torch.testing.assert_close(logits[1], reference_logits(ref, long)[20:21], **TOL)
    torch.testing.assert_close(
        torch.cat([logits[0][:20], logits[1], logits[2]]), reference_logits(ref, long), **TOL
    )
    torch.testing.assert_close(logits[0][20:], reference_logits(ref, short), **TOL)


def test_decode_steps_match(oracle) -> None:
    _, path, ref = oracle
    worker = make_worker(path)
    seqs = prompts([20, 7, 33], seed=3)
    decode_steps = 8
    plans = ManualPlans(PAGE_SIZE, NUM_PAGES, seed=3)
    worker.logits_for(plans.prefill([(f"s{i}", s[: len(s) - decode_steps + 1]) for i, s in enumerate(seqs)]))
    expected = [reference_logits(ref, s) for s in seqs]
    for step in range(1, decode_steps):
        positions = [len(s) - decode_steps + step for s in seqs]
        plan = plans.decode([(f"s{i}", s[p]) for i, (s, p) in enumerate(zip(seqs, positions, strict=True))])
        logits = worker.logits_for(plan)
        for i, p in enumerate(positions):
            torch.testing.assert_close(logits[i], expected[i][p], **TOL)


def test_empty_step_runs(oracle) -> None:
    """A rank with no work still runs the step (T = 0): every layer handles zero tokens."""
    _, path, _ = oracle
    worker = make_worker(path)
    plans = ManualPlans(PAGE_SIZE, NUM_PAGES)
    for plan in (plans.prefill([]), plans.decode([])):
        assert worker.logits_for(plan, all_positions=True).shape == (0, 512)


def oracle_llm(path):
    """The offline engine on the oracle's checkpoint: float32 on the CPU, 48-token prefill chunks."""
    from nmoe_serve.llm import LLM

    return LLM(
        path,
        dtype="float32",
        device="cpu",
        page_size=PAGE_SIZE,
        num_pages=NUM_PAGES,
        max_seq_len=1024,
        max_prefill_tokens=48,
    )


def test_greedy_generation_is_identical(oracle) -> None:
    _, path, ref = oracle
    llm = oracle_llm(path)
    seqs = prompts([12, 50, 3], seed=4)
    outputs = llm.generate(seqs, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
    ref.generation_config.eos_token_id = None
    for seq, out in zip(seqs, outputs, strict=True):
        with torch.no_grad():
            expected = ref.generate(
                torch.tensor([seq]),
                max_new_tokens=32,
                do_sample=False,
                pad_token_id=0,
            )[0, len(seq) :].tolist()
        assert out.outputs[0].token_ids == expected


def test_prefill_after_cached_pages_matches_a_fresh_prefill(oracle) -> None:
    """Prefix caching: a sequence whose first pages are another's (shared page-table entries) and
    whose prefill starts after them gives, from the first uncached position on, the logits of a fresh
    prefill of the whole sequence (within 1e-5 in float32: the same kernels read the same latents)
    and of transformers (TOL)."""
    _, path, ref = oracle
    worker = make_worker(path)
    first, tail = prompts([48, 21], seed=5)
    second = first[:40] + tail  # shares five full pages (40 tokens) with `first`
    plans = ManualPlans(PAGE_SIZE, NUM_PAGES, seed=5)
    worker.logits_for(plans.prefill([("first", first)]))
    plans.pages["second"], plans.lengths["second"] = plans.pages["first"][:5], 40
    cached = worker.logits_for(plans.prefill([("second", second[40:])]), all_positions=True)
    fresh = worker.logits_for(plans.prefill([("fresh", second)]), all_positions=True)
    torch.testing.assert_close(cached, fresh[40:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached, reference_logits(ref, second)[40:], **TOL)


def test_greedy_generation_with_cached_prefixes_is_identical(oracle) -> None:
    """Two turns of a conversation through the engine with prefix caching on: the second turn reads
    the first turn's pages (prompt and decoded tokens) and still generates transformers' tokens."""
    _, path, ref = oracle
    llm = oracle_llm(path)
    ref.generation_config.eos_token_id = None
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    system, user1, user2 = prompts([30, 7, 5], seed=6)
    turn1 = llm.generate([system + user1], greedy)[0]
    turn2_prompt = system + user1 + turn1.outputs[0].token_ids + user2
    turn2 = llm.generate([turn2_prompt], greedy)[0]
    assert turn1.num_cached_tokens == 0
    assert turn2.num_cached_tokens == (len(system + user1) + 15) // PAGE_SIZE * PAGE_SIZE
    for prompt, out in ((system + user1, turn1), (turn2_prompt, turn2)):
        with torch.no_grad():
            expected = ref.generate(
                torch.tensor([prompt]), max_new_tokens=16, do_sample=False, pad_token_id=0
            )
        assert out.outputs[0].token_ids == expected[0, len(prompt) :].tolist()
