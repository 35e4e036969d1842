"""bh_routing.deep_dive_readings: notebook 02's tables and readings state this run's numbers (checked against
the frames they read, recomputed independently)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd

from bh_routing import analysis, deep_dive_readings as dd


def sweep_runs() -> pd.DataFrame:
    rows = [{"label": "native", "group": "native", "strategy": "topk", "k": "8", "native": True,
             "word_perplexity": 50.0, "mean_experts": 8.0, "status": "ok"}]
    for alpha, k, ppl in ((0.10, 5.0, 51.0), (0.01, 3.0, 55.0)):  # out of order on purpose
        rows.append({"label": f"bh {alpha}", "group": "alpha/empirical", "strategy": "bh", "pvalues": "empirical",
                     "alpha": str(alpha), "mean_experts": k, "word_perplexity": ppl, "status": "ok", "native": False})
    for alpha, max_k, k, ceiling in ((0.05, 8, 6.0, 0.3), (0.05, 64, 9.0, 0.01), (0.01, 64, 4.0, 0.0)):
        rows.append({"label": f"grid {alpha} {max_k}", "group": "alpha x max_k", "strategy": "bh", "alpha": alpha,
                     "max_k": max_k, "mean_experts": k, "ceiling_rate": ceiling, "word_perplexity": 52.0,
                     "status": "ok", "native": False})
    rows.append({"label": "top-16", "group": "top-k", "strategy": "topk", "k": "16", "mean_experts": 16.0,
                 "word_perplexity": 49.0, "status": "ok", "native": False})
    rows.append({"label": "broken", "group": "alpha/zscore", "strategy": "bh", "status": "failed",
                 "error": "CUDA out of memory", "native": False})
    return pd.DataFrame(rows)


def test_sweep_tables_split_the_runs_by_section_and_read_them():
    tables = dd.SweepTables.from_report(SimpleNamespace(runs=sweep_runs()), ("empirical", "zscore"))
    assert tables.native_perplexity == 50.0
    assert tables.alpha["alpha"].tolist() == [0.01, 0.10]  # numeric and sorted
    assert tables.topk["label"].tolist() == ["native", "top-16"] and tables.failed["label"].tolist() == ["broken"]
    pivot = tables.alpha_table()
    assert pivot["word_perplexity (empirical)"].tolist() == [55.0, 51.0]
    text = tables.describe_alpha("empirical")
    assert "α from 0.01 to 0.1 moves BH from 3.00 to 5.00 experts and perplexity from 55 to 51" in text
    grid = tables.describe_grid()
    assert grid.startswith("With max_k = 64, BH uses 4.00 experts at α = 0.01 (ceiling 0%), 9.00 experts at α = 0.05")
    assert "at max_k = 8 the ceiling is hit by 30% of tokens" in grid
    assert "broken: CUDA out of memory" in tables.describe_runs()
    assert tables.grid_table().set_index("max_k").loc[64, "mean_experts α=0.01"] == 4.0


def test_readings_state_the_numbers_of_their_tables():
    naive = pd.DataFrame({"pvalues": ["softmax", "empirical"], "min_p_median": [0.9, 1.5e-4],
                          "reach_rate": [0.0, 0.987], "bh_k_raw": [0.0, 5.65], "mean_experts": [1.0, 5.32],
                          "floor_rate": [1.0, 0.056]})
    lines = dd.describe_naive(naive, 0.05, 256, 5, 64)
    assert lines[0] == "On 256 tokens × 5 layers, α = 0.05 (α/N = 0.00078):"
    assert "98.7% of tokens reach α/N, BH alone selects 5.65, the strategy uses 5.32 experts (floor 6%)" in lines[2]
    counts = np.array([[1, 4, 1], [3, 8, 2]])  # [L, T]
    text = dd.describe_token_counts(["a", "b", "c"], counts)
    assert text.startswith("Most experts: 'b' (6.00 per layer); fewest: 'c' (1.50)")
    assert "ranges 2.00–4.33" in text


def test_comparison_reading_matches_an_independent_paired_test():
    rng = np.random.default_rng(0)
    native_nll, bh_nll = rng.normal(3, 0.2, 10), rng.normal(3.05, 0.2, 10)
    native = SimpleNamespace(table=pd.DataFrame({"id": range(10), "nll": native_nll, "mean_experts": 8.0}))
    bh = SimpleNamespace(table=pd.DataFrame({"id": range(10), "nll": bh_nll,
                                             "mean_experts": rng.uniform(3, 6, 10)}))
    stats = analysis.paired_comparison(native_nll, bh_nll, unit="prompt")
    tests = pd.DataFrame([{"metric": "nll", **{k: v for k, v in stats.items() if k not in ("notes", "difference")}}])
    from scipy import stats as scipy_stats
    t_p = scipy_stats.ttest_rel(bh_nll, native_nll).pvalue
    text = dd.describe_comparison(tests, native, bh)
    assert f"paired t p = {t_p:.3g}" in text and "n = 10 prompts" in text
    assert f"NLL changes by {np.mean(bh_nll - native_nll):+.3g} nats/token" in text
    assert f"BH uses {bh.table['mean_experts'].mean():.2f} experts" in text


def test_alpha_reaching_finds_the_first_alpha_per_target():
    curve = pd.DataFrame({"pvalues": ["a"] * 6, "alpha": [0.01, 0.01, 0.05, 0.05, 0.1, 0.1], "layer": [0, 1] * 3,
                          "mean_experts": [1.0, 2.0, 2.0, 3.0, 4.0, 4.2]})
    reach = dd.alpha_reaching(curve, targets=(2, 4, 8)).set_index("target")
    assert reach.loc[2, "alpha"] == 0.05 and reach.loc[4, "alpha"] == 0.1  # layer means 1.5, 2.5, 4.1
    assert np.isnan(reach.loc[8, "alpha"]) and reach.loc[8, "mean_experts"] == 4.1
    assert dd.describe_reach(reach.reset_index())[2] == "`a` reaches a mean of 8 experts at no α of the grid (at most 4.10)"
