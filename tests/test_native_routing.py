"""bh_routing.native_routing: the native router's statistics against plain per-token loops,
scikit-learn and transformers' own router output."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch

from bh_routing import native_routing as native
from conftest import make_routing_sample, needs_tiny

pytestmark = pytest.mark.usefixtures("offline_hub")



# --------------------------------------------------------------------------- native routing statistics


def test_routing_statistics_match_a_per_token_loop():
    sample = make_routing_sample()
    stats = native.routing_statistics(sample)
    n, k = sample.num_experts, sample.top_k
    for layer, logits in enumerate(sample.logits):
        x = logits.double().numpy()
        probs = np.exp(x - x.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        top1, entropy, mass, load = [], [], [], np.zeros(n)
        for row in probs:
            order = sorted(range(n), key=lambda e: -row[e])
            top1.append(row[order[0]])
            entropy.append(-sum(p * math.log(p) for p in row))
            mass.append(sum(row[e] for e in order[:k]))
            for e in order[:k]:
                load[e] += 1
        mean_load = load.mean()
        gini = np.abs(load[:, None] - load[None, :]).sum() / (2 * n * n * mean_load)
        row = stats.iloc[layer]
        assert row["max_weight_mean"] == pytest.approx(np.mean(top1), rel=1e-9)
        assert row["max_weight_median"] == pytest.approx(np.median(top1), rel=1e-9)
        assert row["entropy_nats"] == pytest.approx(np.mean(entropy), rel=1e-9)
        assert row["entropy_norm"] == pytest.approx(np.mean(entropy) / math.log(n), rel=1e-9)
        assert row["topk_mass"] == pytest.approx(np.mean(mass), rel=1e-9)
        assert row["mass_left_out"] == pytest.approx(1 - np.mean(mass), rel=1e-9)
        assert row["top_expert"] == int(load.argmax())
        assert row["top_expert_usage"] == pytest.approx(load.max() / len(probs))
        assert row["dead_experts"] == int((load == 0).sum())
        assert row["load_cv"] == pytest.approx(load.std() / mean_load, rel=1e-9)
        assert row["load_gini"] == pytest.approx(gini, rel=1e-9)
        assert row["logit_std"] == pytest.approx(x.std(ddof=1), rel=1e-6)


def test_concentration_and_usage_match_sorting():
    sample = make_routing_sample(layers=2)
    conc = native.concentration(sample, ks=(1, 2, 4))
    usage = native.expert_usage(sample)
    for layer, logits in enumerate(sample.logits):
        probs = torch.softmax(logits.double(), -1).numpy()
        ordered = -np.sort(-probs, axis=1)
        for k in (1, 2, 4):
            got = conc[(conc.layer == layer) & (conc.k == k)].iloc[0]
            assert got["mass"] == pytest.approx(ordered[:, :k].sum(axis=1).mean(), rel=1e-9)
            assert got["uniform"] == k / sample.num_experts
        expected = np.zeros(sample.num_experts, dtype=int)
        for row in probs:
            expected[np.argsort(-row, kind="stable")[:sample.top_k]] += 1
        np.testing.assert_array_equal(usage[layer], expected)


def test_coactivation_pairs_match_set_counting():
    sample = make_routing_sample(layers=1, tokens=600, experts=12, top_k=3)
    pairs = native.coactivation_pairs(sample, 0, n=200, min_tokens=1)
    chosen = [set(np.argsort(-row, kind="stable")[:3].tolist()) for row in torch.softmax(sample.logits[0], -1).numpy()]
    tokens = len(chosen)
    expected = {}
    for i, j in itertools.combinations(range(12), 2):
        both = sum(1 for s in chosen if i in s and j in s)
        load_i, load_j = sum(i in s for s in chosen), sum(j in s for s in chosen)
        if both:
            expected[(i, j)] = (both, both / (load_i + load_j - both), both * tokens / (load_i * load_j))
    assert len(pairs) == len(expected)
    for row in pairs.itertuples():
        both, jaccard, lift = expected[(row.expert_i, row.expert_j)]
        assert row.together == both
        assert row.jaccard == pytest.approx(jaccard)
        assert row.lift == pytest.approx(lift)
    assert list(pairs["lift"]) == sorted(pairs["lift"], reverse=True)


def test_mutual_information_matches_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    labels = rng.choice(["x", "y", "z"], 5000)
    experts = (rng.integers(0, 16, 5000) + (labels == "x") * 3) % 16
    got = native._mutual_information_bits(labels, experts, 16)
    assert got == pytest.approx(metrics.mutual_info_score(labels, experts) / math.log(2), rel=1e-9)


def test_domain_specialisation_separates_sources_that_use_different_experts():
    tokens, experts = 512, 16
    logits = torch.full((tokens, experts), -5.0)
    source = np.array(["a"] * (tokens // 2) + ["b"] * (tokens // 2), dtype=object)
    logits[: tokens // 2, :4] = 5.0  # source a uses experts 0-3, b uses 8-11: top-4 identifies the source
    logits[tokens // 2:, 8:12] = 5.0
    logits += torch.randn(tokens, experts, generator=torch.Generator().manual_seed(1)) * 0.01
    sample = native.RoutingSample([logits], np.zeros(tokens, int), source, np.zeros(tokens, int), np.arange(tokens), 4)
    spec = native.domain_specialisation(sample, min_tokens=8)
    assert spec.loc[0, "mi_bits"] == pytest.approx(1.0, abs=1e-9)  # H(source) = 1 bit, fully determined
    assert spec.loc[0, "mi_norm"] == pytest.approx(1.0, abs=1e-9)
    assert spec.loc[0, "mi_shuffled_bits"] < 0.05
    usage = native.domain_usage(sample, 0)
    np.testing.assert_allclose(usage.loc["a"].to_numpy()[:4], 0.25)
    np.testing.assert_allclose(usage.loc["all"].to_numpy()[[0, 8]], 0.125)
    assert list(native.domain_usage(sample, 0, min_tokens=tokens // 2 + 1).index) == ["all"]   # too short: left out
    top = native.specialised_experts(sample, n=3, min_tokens=8)
    np.testing.assert_allclose(top["lift"], 2.0)  # P(e | a) = 1/4, P(e) = 1/8


def test_token_view_and_select():
    sample = make_routing_sample(layers=2, tokens=60)

    class Tok:
        def decode(self, ids):
            return f"<{ids[0]}>"
    view = native.token_view(sample, Tok(), text=1)
    keep = np.flatnonzero(sample.text == 1)
    assert len(view) == 2 * keep.size
    probs = torch.softmax(sample.logits[1][torch.as_tensor(keep)].double(), -1)
    layer1 = view[view.layer == 1]
    np.testing.assert_allclose(layer1["top1_prob"], probs.max(dim=1).values.numpy())
    np.testing.assert_array_equal(layer1["top1_expert"], probs.argmax(dim=1).numpy())
    sub = sample.select(sample.source == "a")
    assert sub.num_tokens == (sample.source == "a").sum()
    torch.testing.assert_close(sub.logits[0], sample.logits[0][torch.as_tensor(np.flatnonzero(sample.source == "a"))])


def test_describe_baseline_numbers_come_from_the_tables():
    sample = make_routing_sample()
    stats, conc = native.routing_statistics(sample), native.concentration(sample, (1, 2, 4))
    lines = native.describe_baseline(stats, conc, None, sample.num_experts, sample.top_k, model_id="tiny")
    assert "2.6 M-parameter pipeline model" in lines[0]                      # the model named for what it is
    assert f"{stats['max_weight_mean'].mean():.3f}" in lines[1]
    assert f"{stats['max_weight_mean'].mean() * sample.num_experts:.1f}× the" in lines[1]
    assert f"{stats['topk_mass'].mean():.1%}" in lines[2]
    assert f"{int(stats['dead_experts'].sum())}" in lines[5]


# --------------------------------------------------------------------------- BH explained


@needs_tiny
def test_record_native_routing_equals_transformers_router_logits():
    from bh_routing.models import load_model
    model, tokenizer = load_model("tiny", verbose=False)
    texts = {"one": ["The cat sat on the mat.", "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12"], "two": ["def f(x):\n    return x"]}
    sample = native.record_native_routing(model, tokenizer, texts, max_length=8, batch_size=3, progress=False)
    rows = 0
    for text_index in np.unique(sample.text):  # each window alone, unpadded, through transformers' own router output
        keep = np.flatnonzero(sample.text == text_index)
        ids = torch.tensor(sample.token_ids[keep])[None]
        with torch.no_grad():
            out = model(input_ids=ids, output_router_logits=True)
        for layer, reference in enumerate(out.router_logits):
            torch.testing.assert_close(sample.logits[layer][torch.as_tensor(keep)], reference.float(), atol=1e-5, rtol=1e-5)
        rows += keep.size
    assert rows == sample.num_tokens
    assert set(sample.source) == {"one", "two"}
    capped = native.record_native_routing(model, tokenizer, texts, max_length=8, max_tokens_per_source=5, progress=False)
    assert (pd.Series(capped.source).value_counts() <= 5).all()




# --------------------------------------------------------------------------- readings


def test_usage_reading_names_the_busiest_pair_and_counts_unused_ones():
    usage = np.array([[10, 0, 30, 40], [25, 25, 25, 25]])  # [layers, experts]; layer 0 mean 20
    text = native.describe_usage(usage, num_tokens=50)
    # relative to the layer mean: layer 0 is [0.5, 0, 1.5, 2.0], layer 1 all 1.0 -> busiest layer 0,
    # expert 3 at 2.0x; one pair never chosen and only it below a quarter of the mean
    assert "layer 0, expert 3, at 2.0×" in text
    assert "1 of 8 (layer, expert) pairs were never chosen on these 50 tokens" in text
    assert "and 1 get less than a quarter" in text


def test_entropy_and_mass_readings_quote_the_table():
    stats = pd.DataFrame({"layer": [0, 1, 2], "entropy_norm": [0.5, 0.9, 0.2],
                          "mass_left_out": [0.30, 0.10, 0.45], "topk_mass": [0.70, 0.90, 0.55]})
    entropy = native.describe_entropy(stats)
    assert "0.50, 0.90, 0.20 (layers 0–2)" in entropy
    assert "flattest layer is 1, the most decisive 2" in entropy
    mass = native.describe_mass_left_out(stats, top_k=8)
    assert f"leave out {np.mean([0.30, 0.10, 0.45]):.1%}" in mass and "(layer 2: 45.0%)" in mass
    assert f"{np.mean([0.70, 0.90, 0.55]):.2f} on average" in mass


def test_token_view_reading_picks_the_most_and_least_decided_tokens():
    views = pd.DataFrame({"source": ["a"] * 4, "position": [0, 0, 1, 1], "token": ["x", "x", "y", "y"],
                          "top1_prob": [0.9, 0.7, 0.2, 0.4]})
    text = native.describe_token_views(views)
    assert "most decided on 'x' (a, mean top-1 probability 0.800)" in text
    assert "least on 'y' (a, 0.300)" in text
    assert native.describe_token_views(pd.DataFrame(columns=["source"])) == ""
