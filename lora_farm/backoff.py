"""Exponential backoff, the one rule every retry loop of the farm waits by."""

from __future__ import annotations


def backoff_seconds(tries: int, first: float, most: float) -> float:
    """The wait after the ``tries``-th failure (1-based): ``first``, twice that, ... capped at ``most``."""
    return min(first * 2 ** max(tries - 1, 0), most)
