"""The fan-out of a request into engine requests and the shaping of their outputs: ids, choice
indices and seeds, detokenized text, stop strings, logprobs, and OpenAI's chunks."""

from __future__ import annotations

import pytest

from nmoe_serve.engine.request import FinishReason
from nmoe_serve.engine.scheduler import TokenUpdate
from nmoe_serve.frontend.generation import Generation
from nmoe_serve.frontend.openai import OpenAIShapes
from nmoe_serve.sampling.params import SamplingParams
from nmoe_serve.tokenizer import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def feed(
    generation: Generation, index: int, text: str, tokenizer, finish: FinishReason | None = None
) -> bool:
    """Updates carrying the tokens of `text` to completion `index`; True if a stop string hit."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    updates = [TokenUpdate(f"x-{index}", t) for t in ids]
    updates[-1].finish_reason = finish
    return generation.apply(generation.completions[index], updates)


def test_fan_out_gives_each_prompt_n_samples_with_their_own_seeds(tokenizer) -> None:
    sampling = SamplingParams(n=3, seed=10, max_tokens=4)
    generation = Generation.fan_out("req", [[1, 2], [3]], sampling, tokenizer)
    ids = [c.engine_id for c in generation.completions]
    assert ids == ["req-0-0", "req-0-1", "req-0-2", "req-1-0", "req-1-1", "req-1-2"]
    assert [c.index for c in generation.completions] == list(range(6))
    assert [c.sampling.seed for c in generation.completions] == [10, 11, 12, 10, 11, 12]
    assert all(c.sampling.n == 1 for c in generation.completions)
    outputs = generation.outputs()
    assert [o.request_id for o in outputs] == ["req-0", "req-1"] and len(outputs[1].outputs) == 3
    assert generation.prompt_tokens == 3


def test_text_streams_and_a_stop_string_cuts_it(tokenizer) -> None:
    generation = Generation.fan_out("x", [[1]], SamplingParams(stop=("brown",)), tokenizer)
    assert not feed(generation, 0, "The quick", tokenizer)
    assert generation.completions[0].output.text == "The quick"
    assert feed(generation, 0, " brown fox", tokenizer)
    out = generation.completions[0].output
    assert out.text == "The quick " and out.finish_reason == "stop" and out.stop_reason == "brown"
    assert generation.finished


def test_a_stop_token_ends_without_its_text_and_logprobs_are_kept(tokenizer) -> None:
    generation = Generation.fan_out("x", [[1]], SamplingParams(logprobs=1), tokenizer)
    completion = generation.completions[0]
    generation.apply(completion, [TokenUpdate("x-0-0", 300, logprob=-0.5, top_logprobs=((301, -0.1),))])
    eos = tokenizer.eos_token_id
    generation.apply(completion, [TokenUpdate("x-0-0", eos, -0.2, (), FinishReason.STOP, None)])
    out = completion.output
    assert out.token_ids == [300, eos] and out.finish_reason == "stop"
    assert out.text == tokenizer.decode([300])
    assert out.logprobs is not None and set(out.logprobs[0]) == {300, 301}


def test_stream_deltas_hold_back_a_possible_stop_string(tokenizer) -> None:
    generation = Generation.fan_out("cmpl-1", [[1]], SamplingParams(stop=("xyz",)), tokenizer)
    shapes = OpenAIShapes("tiny", chat=False)
    feed(generation, 0, "hello wor", tokenizer)
    first = shapes.delta(generation, generation.completions[0])
    # len("xyz") - 1 = 2 characters are held back while the text could still end in a stop string
    assert first is not None and first["choices"][0]["text"] == "hello w"
    feed(generation, 0, "ld", tokenizer, FinishReason.LENGTH)
    last = shapes.delta(generation, generation.completions[0])
    assert last is not None and last["choices"][0]["text"] == "orld"
    assert last["choices"][0]["finish_reason"] == "length"
    usage = shapes.usage_chunk(generation)["usage"]
    assert usage == {
        "prompt_tokens": 1,
        "completion_tokens": usage["completion_tokens"],
        "total_tokens": usage["total_tokens"],
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert usage["total_tokens"] == 1 + len(generation.completions[0].output.token_ids)


def test_chat_streams_open_with_the_role_and_answer_in_messages(tokenizer) -> None:
    generation = Generation.fan_out("chat-1", [[1]], SamplingParams(n=2), tokenizer)
    shapes = OpenAIShapes("tiny", chat=True)
    openings = shapes.role_chunks(generation)
    assert [c["choices"][0]["delta"] for c in openings] == [{"role": "assistant", "content": ""}] * 2
    feed(generation, 1, "hi", tokenizer, FinishReason.LENGTH)
    body = shapes.response(generation)
    assert body["object"] == "chat.completion" and body["choices"][1]["message"]["content"] == "hi"
    assert OpenAIShapes("tiny", chat=False).role_chunks(generation) == []
