"""bh_routing.comparison and cost: the comparison and matched-compute tables, and the tokens a
sweep scores, counted as the evaluator feeds them."""
from __future__ import annotations


import pandas as pd
import pytest

from bh_routing import experiments as ex
from bh_routing import comparison, cost
from conftest import needs_tiny

pytestmark = pytest.mark.usefixtures("offline_hub")




# --------------------------------------------------------------------------- sweep tables


def _runs_frame():
    rows = []
    for task, metric, values in (("wikitext", "word_perplexity", (10.0, 12.0, 11.0, 13.0)),
                                 ("hellaswag", "acc_norm", (0.5, 0.4, 0.45, 0.3)),
                                 ("lambada", "acc", (0.6, 0.5, 0.55, 0.4))):
        for (label, group, strategy, k, experts, target), value in zip(
                [("top-8", "top-k", "topk", 8, 8.0, None), ("top-4", "top-k", "topk", 4, 4.0, None),
                 ("BH α=0.05 max_k=8", "adaptive", "bh", None, 5.0, None),
                 ("BH empirical @k̄=4", "matched k=4", "bh", None, 4.1, 4.0)],
                values):
            rows.append({"label": label, "group": group, "strategy": strategy, "k": k, "task": task, "status": "ok",
                         "pvalues": "empirical" if strategy == "bh" else None, "target_k": target,
                         "mean_experts": experts + (0.1 if task == "lambada" and strategy == "bh" else 0),
                         "floor_rate": 0.1 if strategy == "bh" else 1.0, "ceiling_rate": 0.2, metric: value})
    return pd.DataFrame(rows)


def test_comparison_and_matched_tables():
    runs = _runs_frame()
    main = runs[runs["target_k"].isna()]
    table = comparison.comparison_table(main)
    assert list(table["label"]) == ["BH α=0.05 max_k=8", "top-4", "top-8"]
    bh = table.set_index("label").loc["BH α=0.05 max_k=8"]
    assert bh["mean_experts"] == pytest.approx((5.0 + 5.0 + 5.1) / 3)
    assert (bh["wikitext_word_perplexity"], bh["hellaswag_acc_norm"], bh["lambada_acc"]) == (11.0, 0.45, 0.55)
    matched = comparison.matched_table(runs)            # found by the runs' target_k, not by their group names
    assert set(matched["family"]) == {"BH empirical", "top-k"}
    assert matched.set_index("family").loc["top-k", "word_perplexity"] == 12.0  # top-4 from the preset


def test_representative_runs_mix_tasks_and_strategies():
    runs = ex.full_experiments(ex.BUDGETS["smoke"])
    mix = cost.representative_runs(runs, limit=8)
    assert len(mix) == 8 and {r.task for r in mix} == {"wikitext", "hellaswag", "lambada"}
    assert len({(r.task, r.routing["strategy"]) for r in mix}) == 8


def test_new_runs_drop_repeats_of_the_preset():
    budget = ex.BUDGETS["smoke"]
    preset = ex.full_experiments(budget)
    extra = [ex.Run("top-4", {"strategy": "topk", "k": 4}, "wikitext", budget.n_for("wikitext"), max_length=budget.max_length,
                    group="matched k=4"),
             ex.Run("x", {"strategy": "top_p", "p": 0.123, "max_k": 8}, "wikitext", budget.n_for("wikitext"),
                    max_length=budget.max_length, group="matched k=4")]
    assert [r.label for r in comparison.new_runs(preset, extra)] == ["x"]
    assert len(cost.matched_runs_for_estimate(budget)) == 4 * cost.MATCHED_STRATEGIES


@needs_tiny
def test_run_tokens_equal_what_the_evaluator_feeds_the_model():
    from bh_routing.evaluation import evaluate
    from bh_routing.models import load_model
    model, tokenizer = load_model("tiny", verbose=False)
    for task, n in (("lambada", 4), ("hellaswag", 3)):
        run = ex.Run("native", {"strategy": "topk", "k": 8}, task, n, max_length=64)
        result = evaluate(model, tokenizer, task, n=n, max_length=64)
        assert cost.run_tokens(run, tokenizer) == result.config["scoring"]["input_tokens"]
    estimate = cost.estimate_sweep([run, run], tokenizer, tokens_per_s=100.0)
    assert estimate["tokens"].iloc[0] == 2 * result.config["scoring"]["input_tokens"]
    assert estimate["seconds"].iloc[0] == pytest.approx(estimate["tokens"].iloc[0] / 100.0)


# --------------------------------------------------------------------------- with a model


