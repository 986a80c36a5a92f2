"""Request validation, in one place for the offline API and the HTTP ingress.

A request is checked before any engine request is made: token ids inside the vocabulary, stop
token ids inside it too, and each prompt with its max_tokens inside the context
(`engine.request.output_budget`, the rule the scheduler applies). A refusal is an
InvalidRequest naming the field (`param`) and what to do; the ingress answers it with 400, the
offline API raises it (a ValueError).
"""

from __future__ import annotations

from collections.abc import Sequence

from nmoe_serve.engine.request import RequestRejected, output_budget
from nmoe_serve.sampling.params import SamplingParams


class InvalidRequest(RequestRejected):
    """A request the server refuses as sent; `param` names the request field at fault."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


def check_token_ids(ids: Sequence[object], vocab_size: int, param: str = "prompt") -> list[int]:
    """`ids` as a list of ints in [0, vocab_size); InvalidRequest naming `param` otherwise."""
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequest(
            f"{param} token ids must be integers in [0, {vocab_size}) for this model; got {bad[:5]}", param
        )
    return list(ids)  # type: ignore[arg-type]


def check_request(
    prompts: Sequence[Sequence[int]], sampling: SamplingParams, vocab_size: int, max_seq_len: int
) -> None:
    """Refuse a request (prompts of token ids, one SamplingParams) that can never be served."""
    for ids in prompts:
        check_token_ids(ids, vocab_size)
        try:
            output_budget(len(ids), sampling.max_tokens, max_seq_len)
        except RequestRejected as e:
            fits_alone = 0 < len(ids) < max_seq_len
            param = "max_tokens" if fits_alone else "prompt"
            code = "context_length_exceeded" if ids else None
            raise InvalidRequest(str(e), param, code) from None
    check_token_ids(sampling.stop_token_ids, vocab_size, param="stop_token_ids")
