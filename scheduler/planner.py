"""Batch planning as a pure function: lengths and limits in, batches out. No clock, no queue, no torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Limits:
    """Hard limits a batch must respect."""

    max_batch_tokens: int
    max_batch_requests: int

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1 or self.max_batch_requests < 1:
            raise ValueError(f"limits must be positive: {self}")


@dataclass(frozen=True)
class Batch:
    """Indices into the pending list (in the order they run) and the batch's packed token count."""

    indices: tuple[int, ...]
    tokens: int


def plan_token_budget(lengths: Sequence[int], limits: Limits) -> list[Batch]:
    """TEI-style greedy batching in arrival order under a token budget and a request cap.

    Packed execution pays for real tokens only, so the budget counts the sum of lengths, not
    max length × count. An input longer than the budget on its own still gets a batch of one:
    every pending index appears in exactly one batch.
    """
    batches: list[Batch] = []
    current: list[int] = []
    tokens = 0
    for i, n in enumerate(lengths):
        if current and (tokens + n > limits.max_batch_tokens or len(current) == limits.max_batch_requests):
            batches.append(Batch(tuple(current), tokens))
            current, tokens = [], 0
        current.append(i)
        tokens += n
    if current:
        batches.append(Batch(tuple(current), tokens))
    return batches


POLICIES = {"token_budget": plan_token_budget}


def plan(lengths: Sequence[int], limits: Limits, policy: str = "token_budget") -> list[Batch]:
    """Plan all pending requests (given by token length, in arrival order) into batches."""
    try:
        planner = POLICIES[policy]
    except KeyError:
        raise ValueError(f"unknown scheduler policy {policy!r}; known: {', '.join(POLICIES)}") from None
    return planner(lengths, limits)
