"""Batch planning: split length-sorted rows into forward passes under a token budget, trading
padding against the fixed cost of each pass."""
from __future__ import annotations

from typing import Sequence

import numpy as np

# What one more forward pass costs, in padded tokens. A pass has a cost that does not scale with its
# tokens: every layer's kernels start, every expert's weights are read. On the bundled tiny model a
# pass costs about what 300-450 tokens do (2 CPU threads). Against a simpler rule (a new batch
# when rows fall below 80 % of the longest), 256 takes 0.95x the time at 1 thread on HellaSwag (50
# items) and 0.97x / 0.94x at 2 threads on HellaSwag / LAMBADA (100 items): medians of 9 interleaved
# paired runs of the whole evaluator. OLMoE-1B-7B on a GPU is near this (16 layers x 64 experts of
# kernel starts against ~0.1 ms a token); on a CPU, where a token costs more, 256 keeps the padding it
# may add to an eighth of a 2,048-token batch.
BATCH_OVERHEAD_TOKENS = 256


def plan_batches(widths: Sequence[int], budget: int, overhead: int = BATCH_OVERHEAD_TOKENS) -> list[int]:
    """Sizes of consecutive batches for rows of these widths, sorted longest first.

    A batch of rows i..j-1 is padded to width widths[i] and must fit rows x width <= budget (a row
    wider than the budget gets a batch of its own). Of all such splits, the one with the fewest padded
    tokens + `overhead` per batch, found exactly by dynamic programming over the split points."""
    width = np.asarray(widths, dtype=np.int64)                                  # [n], non-increasing
    if np.any(np.diff(width) > 0):
        raise ValueError("plan_batches needs the widths sorted longest first")
    n = len(width)
    cost = np.full(n + 1, np.inf)       # cost[j]: cheapest plan of rows 0..j-1
    start = np.zeros(n + 1, dtype=np.int64)   # start[j]: first row of that plan's last batch
    cost[0] = 0.0
    for i in range(n):                  # a batch starting at row i, of 1..rows rows
        rows = min(n - i, max(1, budget // int(width[i])))
        candidate = cost[i] + overhead + width[i] * np.arange(1, rows + 1)     # [rows]
        end = slice(i + 1, i + rows + 1)
        better = candidate < cost[end]
        cost[end] = np.where(better, candidate, cost[end])
        start[end] = np.where(better, i, start[end])
    sizes, j = [], n
    while j:
        sizes.append(int(j - start[j]))
        j = int(start[j])
    return sizes[::-1]
