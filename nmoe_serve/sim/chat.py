"""A multi-turn chat workload for the simulator: M conversations sharing one system prompt.

As bench/prefix_chat.py does over HTTP: the M conversations start together at time 0 (or, with a
conversation rate R, as Poisson arrivals at R per second), and each runs K turns one after another
(a closed loop per conversation, no think time). Turn k sends the
whole conversation so far as token ids: the system prompt (S tokens, the same for every
conversation), then every earlier turn's user message and the tokens the engine generated for it,
then a new user message of U tokens. Each answer has N tokens (EOS ignored), or a number drawn
uniformly from [N, N_max] per turn. The generated tokens re-sent are the ones the simulator
streamed, so the pages a turn decoded can be found in the prefix cache by the next turn.

Token ids are drawn from a seeded generator (>= 2, so they differ from the simulator's sampled 1s):
user messages differ between conversations and turns, the system prompt is one draw for all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nmoe_serve.sim.workload import Clients, WorkloadError

TOKEN_IDS = (2, 100_000)  # [low, high) of the drawn token ids


@dataclass(frozen=True)
class ChatWorkload:
    conversations: int  # M
    turns: int  # K per conversation
    system_prompt_tokens: int  # S, shared by every conversation
    user_tokens: int  # U per user message
    output_tokens: int  # N per answer
    output_tokens_max: int | None = None  # answers of N..N_max tokens, uniform per turn (None: N)
    conversation_rate: float | None = None  # R: conversations start as Poisson arrivals (None: all at 0)
    seed: int = 0

    def __post_init__(self) -> None:
        for name, value in (
            ("--conversations", self.conversations),
            ("--turns", self.turns),
            ("--user-tokens", self.user_tokens),
            ("--output-tokens", self.output_tokens),
        ):
            if value < 1:
                raise WorkloadError(f"{name} must be at least 1, got {value}")
        if self.conversation_rate is not None and not self.conversation_rate > 0:
            raise WorkloadError(
                f"--conversation-rate must be a positive number of conversations per second, got {self.conversation_rate}"
            )
        if self.system_prompt_tokens < 0:
            raise WorkloadError(f"--system-prompt-tokens must be >= 0, got {self.system_prompt_tokens}")
        if self.output_tokens_max is not None and self.output_tokens_max < self.output_tokens:
            raise WorkloadError(
                f"--output-tokens-max ({self.output_tokens_max}) must be at least --output-tokens "
                f"({self.output_tokens})"
            )

    @property
    def requests(self) -> int:
        return self.conversations * self.turns

    @property
    def longest_prompt(self) -> int:
        """Tokens of the last turn's prompt at the longest answers."""
        answer = self.output_tokens_max or self.output_tokens
        return self.system_prompt_tokens + self.turns * self.user_tokens + (self.turns - 1) * answer

    def start_times(self) -> list[float]:
        """When each conversation sends its first turn."""
        if self.conversation_rate is None:
            return [0.0] * self.conversations
        gaps = np.random.default_rng([self.seed, 3]).exponential(
            1.0 / self.conversation_rate, self.conversations
        )
        return np.cumsum(gaps).tolist()

    def system_prompt(self) -> list[int]:
        rng = np.random.default_rng([self.seed, 0])
        return rng.integers(*TOKEN_IDS, self.system_prompt_tokens).tolist()

    def user_message(self, conversation: int, turn: int) -> list[int]:
        rng = np.random.default_rng([self.seed, 1, conversation, turn])
        return rng.integers(*TOKEN_IDS, self.user_tokens).tolist()

    def answer_tokens(self, conversation: int, turn: int) -> int:
        if self.output_tokens_max is None:
            return self.output_tokens
        rng = np.random.default_rng([self.seed, 2, conversation, turn])
        return int(rng.integers(self.output_tokens, self.output_tokens_max + 1))

    def clients(self) -> Clients:
        return ChatClients(self)

    def describe(self) -> str:
        answers = (
            f"{self.output_tokens}"
            if self.output_tokens_max is None
            else f"{self.output_tokens}-{self.output_tokens_max}"
        )
        start = "at once" if self.conversation_rate is None else f"Poisson {self.conversation_rate:g}/s"
        return (
            f"chat: {self.conversations} conversations ({start}) x {self.turns} turns, system prompt "
            f"{self.system_prompt_tokens}, user {self.user_tokens}, answers {answers} tokens"
        )


class ChatClients:
    """One run's conversations: client c is conversation c; each keeps the token ids sent so far."""

    def __init__(self, workload: ChatWorkload) -> None:
        self.workload = workload
        system = workload.system_prompt()
        self.history = [list(system) for _ in range(workload.conversations)]
        self.turn = [0] * workload.conversations

    def first_sends(self) -> list[tuple[float, int]]:
        return [(at, c) for c, at in enumerate(self.workload.start_times())]

    def prompt(self, client: int, index: int) -> tuple[list[int], int]:
        """The conversation so far plus its next user message (kept in the history)."""
        turn = self.turn[client]
        self.history[client] += self.workload.user_message(client, turn)
        return list(self.history[client]), self.workload.answer_tokens(client, turn)

    def answered(self, client: int, output_token_ids: list[int], at: float) -> float | None:
        self.history[client] += output_token_ids
        self.turn[client] += 1
        return at if self.turn[client] < self.workload.turns else None
