"""The batch planner against every possible split (brute force), and its edge cases."""
import itertools

import numpy as np
import pytest

from bh_routing.evaluation.batching import plan_batches


def plan_cost(widths, sizes, overhead):
    """Padded tokens + overhead per batch of a plan."""
    cost, start = 0, 0
    for size in sizes:
        cost += overhead + size * widths[start]
        start += size
    return cost


def cheapest_by_brute_force(widths, budget, overhead):
    n, best = len(widths), None
    for cuts in itertools.product((False, True), repeat=n - 1):
        sizes, size = [], 1
        for cut in cuts:
            if cut:
                sizes.append(size)
                size = 0
            size += 1
        sizes.append(size)
        starts = np.cumsum([0] + sizes[:-1])
        if all(size == 1 or size * widths[start] <= budget for start, size in zip(starts, sizes)):
            cost = plan_cost(widths, sizes, overhead)
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_plan_is_the_cheapest_split_within_the_budget(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 12))
    widths = sorted(rng.integers(5, 200, n).tolist(), reverse=True)
    budget, overhead = int(rng.integers(100, 800)), int(rng.choice([0, 16, 256]))
    sizes = plan_batches(widths, budget, overhead)
    assert sum(sizes) == n and min(sizes) >= 1
    starts = np.cumsum([0] + sizes[:-1])
    assert all(size == 1 or size * widths[start] <= budget for start, size in zip(starts, sizes))
    assert plan_cost(widths, sizes, overhead) == cheapest_by_brute_force(widths, budget, overhead)


def test_overhead_trades_padding_for_fewer_passes():
    widths = [100, 60, 60, 60]
    assert plan_batches(widths, budget=1000, overhead=0) == [1, 3]      # no padding
    assert plan_batches(widths, budget=1000, overhead=200) == [4]       # 120 padded tokens < one more pass
    assert plan_batches(widths, budget=250, overhead=200) == [1, 3]     # the budget still holds


def test_a_row_wider_than_the_budget_runs_alone_and_unsorted_widths_are_refused():
    assert plan_batches([500, 20, 20], budget=100, overhead=0) == [1, 2]
    assert plan_batches([], budget=100) == []
    with pytest.raises(ValueError, match="sorted longest first"):
        plan_batches([10, 20], budget=100)
