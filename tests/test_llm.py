"""The offline API on the dev checkpoint: prompts in every form, sampling options end to end."""

from __future__ import annotations

import math
import shutil

import pytest

from nmoe_serve.config import ConfigError
from nmoe_serve.engine.request import RequestRejected
from nmoe_serve.llm import LLM
from nmoe_serve.sampling.params import SamplingParams


@pytest.fixture(scope="module")
def llm(dev_config_path) -> LLM:
    return LLM(config=dev_config_path)


def greedy(n: int = 12, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def test_prompt_forms_give_the_same_tokens(llm: LLM) -> None:
    ids = llm.tokenizer.encode("The quick brown fox")
    outs = llm.generate(
        ["The quick brown fox", ids, {"prompt_token_ids": ids}, {"prompt": "The quick brown fox"}], greedy()
    )
    assert all(o.prompt_token_ids == ids for o in outs)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1
    assert outs[0].prompt == "The quick brown fox" and outs[1].prompt is None
    single = llm.generate(ids, greedy())  # one prompt given as a bare list of ids
    assert len(single) == 1 and single[0].outputs[0].token_ids == outs[0].outputs[0].token_ids


def test_text_is_the_decoded_tokens(llm: LLM) -> None:
    out = llm.generate("Once upon a time", greedy(20))[0].outputs[0]
    assert out.text == llm.tokenizer.decode(out.token_ids)
    assert out.finish_reason == "length" and len(out.token_ids) == 20


def test_seed_reproduces_and_differs(llm: LLM) -> None:
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=1234, ignore_eos=True)
    alone = llm.generate("seeded", params)[0].outputs[0].token_ids
    batched = llm.generate(["other prompt", "seeded", "x y z"], [greedy(), params, params.with_seed(99)])
    assert batched[1].outputs[0].token_ids == alone
    assert batched[2].outputs[0].token_ids != alone


def test_n_samples_are_grouped_and_differ(llm: LLM) -> None:
    out = llm.generate(
        "n samples", SamplingParams(n=3, max_tokens=10, temperature=1.0, seed=5, ignore_eos=True)
    )
    assert len(out) == 1 and [c.index for c in out[0].outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out[0].outputs}) == 3
    again = llm.generate(
        "n samples", SamplingParams(n=3, max_tokens=10, temperature=1.0, seed=5, ignore_eos=True)
    )
    assert [c.token_ids for c in again[0].outputs] == [c.token_ids for c in out[0].outputs]


def test_stop_string_is_cut_and_request_ends(llm: LLM) -> None:
    base = llm.generate("stop here", greedy(24))[0].outputs[0]
    text = base.text
    stop = text[5:8]
    assert stop and stop in text
    cut = llm.generate("stop here", greedy(24, stop=[stop]))[0].outputs[0]
    assert cut.text == text[: text.index(stop)]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert len(cut.token_ids) < len(base.token_ids)
    kept = llm.generate("stop here", greedy(24, stop=[stop], include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == text[: text.index(stop) + len(stop)]
    assert all(pool.num_free == pool.num_pages for pool in llm.engine.scheduler.pools)


def test_stop_token_id_and_eos(llm: LLM) -> None:
    base = llm.generate("stop token", greedy(16))[0].outputs[0]
    stop_id = base.token_ids[4]
    out = llm.generate("stop token", greedy(16, stop_token_ids=[stop_id]))[0].outputs[0]
    first = base.token_ids.index(stop_id)
    assert out.token_ids == base.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.text == llm.tokenizer.decode(base.token_ids[:first])  # the stop token's text is left out
    held = llm.generate("stop token", greedy(16, stop_token_ids=[stop_id], min_tokens=first + 2))[0].outputs[
        0
    ]
    assert stop_id not in held.token_ids[: first + 2]


def test_logprobs(llm: LLM) -> None:
    out = llm.generate("logprobs", greedy(6, logprobs=3))[0].outputs[0]
    assert out.logprobs is not None and len(out.logprobs) == 6
    for token, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert token in entry and len(entry) == 3  # greedy: the sampled token is the top one
        values = [lp.logprob for lp in entry.values()]
        assert max(values) == entry[token].logprob <= 0.0
        assert all(math.isfinite(v) for v in values)
        assert entry[token].decoded_token == llm.tokenizer.decode([token], skip_special_tokens=False)
    assert llm.generate("logprobs", greedy(2))[0].outputs[0].logprobs is None


def test_penalties_stop_repetition(llm: LLM) -> None:
    base = llm.generate("penalty", greedy(64))[0].outputs[0].token_ids
    assert max(base.count(t) for t in base) > 1, "precondition: greedy repeats a token within 64"
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 3.0}):
        penalised = llm.generate("penalty", greedy(64, **penalty))[0].outputs[0].token_ids
        assert penalised != base
        assert max(penalised.count(t) for t in penalised) < max(base.count(t) for t in base), penalty


def test_refusals(llm: LLM) -> None:
    with pytest.raises(RequestRejected, match=r"context limit of 2048 tokens.*lower max_tokens"):
        llm.generate([1] * 2000, SamplingParams(max_tokens=100))
    with pytest.raises(RequestRejected, match=r"integers in \[0, 512\)"):
        llm.generate([[1, 2, 9999]], greedy())
    with pytest.raises(RequestRejected, match="empty"):
        llm.generate([[]], greedy())
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm.generate(["a"], [greedy(), greedy()])
    with pytest.raises(ValueError, match="'prompt' or 'prompt_token_ids'"):
        llm.generate([{"text": "a"}])
    # a refused prompt in a batch leaves nothing behind
    with pytest.raises(RequestRejected):
        llm.generate(["fine", [1] * 3000], greedy())
    assert not llm.engine.has_work()
    assert llm.generate("still serving", greedy(2))[0].outputs[0].finish_reason == "length"


def test_engine_options_and_their_refusals(dev_config_path) -> None:
    with pytest.raises(ConfigError, match="unknown engine option 'bogus'"):
        LLM(config=dev_config_path, bogus=1)
    with pytest.raises(ValueError, match="needs a model"):
        LLM()


def test_checkpoint_without_tokenizer_takes_token_ids_only(tmp_path, tiny_fp32) -> None:
    ckpt = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_fp32, ckpt)
    (ckpt / "tokenizer.json").unlink()
    llm = LLM(ckpt, dtype="float32", device="cpu", max_seq_len=256, num_pages=64, page_size=16)
    assert llm.tokenizer is None
    out = llm.generate([[5, 6, 7]], greedy(4))[0].outputs[0]
    assert len(out.token_ids) == 4 and out.text == ""
    with pytest.raises(ValueError, match=r"text prompts need a tokenizer.*pass token ids instead"):
        llm.generate("hello")


def test_prefix_cache_reports_cached_tokens_and_resets(llm: LLM) -> None:
    prompt = list(range(3, 3 + 40))  # the dev config's pages hold 16 tokens
    first = llm.generate([prompt], greedy(4))[0]
    again = llm.generate([prompt], greedy(4))[0]
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert again.num_cached_tokens == 32, "two full pages of the prompt; its last page is computed"
    assert llm.reset_prefix_cache() > 0
    assert llm.engine.scheduler.pools[0].num_cached == 0
    after = llm.generate([prompt], greedy(4))[0]
    assert after.num_cached_tokens == 0 and after.outputs[0].token_ids == first.outputs[0].token_ids
