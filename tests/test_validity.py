"""Validity of every p-value model under every knob the presets, notebooks and CLI can set.

The knobs are enumerated from the presets themselves (experiments' sweeps, matched-compute search
range, the demo runs, notebook 02's sliders), so a new preset value is covered without editing this
file; a config the p-value code refuses (e.g. a temperature on a calibrated model) fails here.

(a) Simulation (seconds): logits drawn i.i.d. per token, a few experts per token shifted up; the
    calibration is built from other tokens of the same distribution, so the calibrated p-values of
    experts outside the native top-k are valid. The full router (tail tables, step-up, clamp) must
    keep the realised FDR of its test discoveries <= α within Monte-Carlo error, for every
    procedure × α × min_k × max_k. For every model (the heuristic ones too) the selection must equal
    statsmodels' ``multipletests`` on the model's own p-values, and neither ``min_k`` nor
    ``weights_temperature`` may change the test's discoveries.
(b) Bundled tiny OLMoE: calibrated on the WikiText calibration articles, tested on evaluation
    articles. Null = experts outside the native top-8. Per layer the null p-values must be
    (super-)uniform — for the heuristic scores (softmax, zscore) only in the tail BH reads,
    P(p <= q) <= q at q <= 0.05 (zscore's bulk is not uniform) — and every preset's BH/BY config
    must keep the held-out FDR near α.
"""
from __future__ import annotations

import math
import warnings
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import torch
from statsmodels.stats.multitest import multipletests

from bh_routing import experiments as ex, matching
from bh_routing import bh_diagnostics as bhd
from bh_routing import pvalues as pv
from bh_routing.__main__ import DEMO_RUNS
from bh_routing.selection import ADAPTIVE_DEFAULTS, STEPUP_DEFAULTS, build_router
from bh_routing.validity import calibration_quality, false_discovery_proportion, native_mask

NUM_EXPERTS, TOP_K = 64, 8
TINY = Path(__file__).resolve().parents[1] / "bh_routing" / "assets" / "tiny-olmoe" / "model.safetensors"


# --------------------------------------------------------------------------- the knobs, from the presets


def preset_stepup_configs() -> list[dict]:
    """Every bh/by routing config a preset, the demo or a notebook can run, with build_router's defaults."""
    budget = ex.BUDGETS["smoke"]
    configs = [r.routing for r in ex.full_experiments(budget) + ex.bh_deep_dive(budget) + ex.prompt_suite(budget)]
    configs += list(matching.MATCHED_ADAPTIVE.values()) + [cfg for _, cfg in DEMO_RUNS]
    # matched compute searches alpha over KNOBS' range; notebook 02's slider spans LIVE_SLIDERS
    for strategy in ("bh", "by"):
        low, high = matching.KNOBS[strategy][1:3]
        configs += [{"strategy": strategy, "alpha": a} for a in (low, high)]
    configs += [{"strategy": "bh", "alpha": a} for a in bhd.LIVE_SLIDERS["alpha"]]
    configs += [{"strategy": "bh", "weights_temperature": t} for t in bhd.LIVE_SLIDERS["weights_temperature"]]
    return [{**ADAPTIVE_DEFAULTS, **STEPUP_DEFAULTS, "temperature": 1.0, "weights_temperature": 1.0, **c}
            for c in configs if c.get("strategy") in ("bh", "by")]


CONFIGS = preset_stepup_configs()
KNOB_VALUES = {knob: sorted({c[knob] for c in CONFIGS})
               for knob in ("alpha", "min_k", "max_k", "temperature", "weights_temperature")}
PROCEDURES = ("bh", "by")


def test_the_enumeration_sees_every_preset_knob():
    assert min(KNOB_VALUES["alpha"]) == matching.KNOBS["bh"][1]  # down to the smallest alpha any search reaches
    assert {0.01, 0.05, 0.10, 0.50} <= set(KNOB_VALUES["alpha"])
    assert {8, 16, 64} <= set(KNOB_VALUES["max_k"])
    assert set(ex.SOFTMAX_TEMPERATURES) <= set(KNOB_VALUES["temperature"])
    assert set(ex.WEIGHTS_TEMPERATURES) <= set(KNOB_VALUES["weights_temperature"])
    known = set(STEPUP_DEFAULTS) | set(ADAPTIVE_DEFAULTS) | {"strategy", "temperature", "weights_temperature"}
    unknown = {k for c in CONFIGS for k in c} - known
    assert not unknown, f"a preset sets {unknown}: add the knob to this module's checks"


def test_every_preset_config_builds_or_refuses_clearly():
    """Temperature on a temperature-invariant model is refused at build time, naming what to use."""
    for config in CONFIGS:
        if config["temperature"] != 1.0 and config["pvalues"] not in pv.TEMPERATURE_MODELS:
            with pytest.raises(ValueError, match="temperature-invariant"):
                build_router(config, _simulation()[0])
    for model in set(pv.PVALUE_MODELS) - set(pv.TEMPERATURE_MODELS):
        with pytest.raises(ValueError, match="temperature-invariant.*weights_temperature"):
            build_router({"strategy": "bh", "pvalues": model, "temperature": 2.0}, _simulation()[0])
    assert set(pv.PVALUE_MODELS) == set(pv.CALIBRATED) | set(pv.HEURISTIC)


# --------------------------------------------------------------------------- (a) simulation


def _draw(tokens: int, generator: torch.Generator) -> torch.Tensor:
    """[T, N] logits: expert biases + N(0, 1), and 4 experts per token shifted up by 3."""
    bias = torch.linspace(-1.0, 1.0, NUM_EXPERTS)
    logits = bias + torch.randn(tokens, NUM_EXPERTS, generator=generator)
    signal = torch.rand(tokens, NUM_EXPERTS, generator=generator).argsort(dim=1)[:, :4]
    return logits.scatter_add(1, signal, torch.full(signal.shape, 3.0))


_SIMULATION = {}


def _simulation():
    """(calibration, test logits [T, N]) from one distribution; null samples enough for c_1 of BH at 0.01."""
    if not _SIMULATION:
        generator = torch.Generator().manual_seed(13)
        calibration_logits = _draw(24000, generator)
        calibration = pv.Calibration.from_router_logits([calibration_logits], TOP_K, max_samples_per_expert=24000)
        _SIMULATION["value"] = calibration, _draw(6000, generator)
    return _SIMULATION["value"]


def _route(config, calibration, logits):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # resolution warnings are expected at small alpha
        return build_router(config, calibration)(logits, 0)


def _fdp(routing, logits) -> tuple[float, float]:
    """Mean over tokens of V/max(R, 1), with its standard error; null = outside the native top-k."""
    false = (routing.mask & ~native_mask(logits, TOP_K).gather(1, routing.indices)).sum(dim=1).double()
    fdp = (false / routing.counts.clamp(min=1)).numpy()
    return float(fdp.mean()), float(fdp.std(ddof=1) / math.sqrt(fdp.size))


@pytest.mark.parametrize("model", pv.CALIBRATED)
@pytest.mark.parametrize("procedure", PROCEDURES)
def test_simulated_fdr_is_controlled_for_every_alpha_and_k_range(model, procedure):
    calibration, logits = _simulation()
    checked = 0
    for alpha, max_k in product(KNOB_VALUES["alpha"], KNOB_VALUES["max_k"]):
        config = {"strategy": procedure, "pvalues": model, "alpha": alpha, "min_k": 0, "max_k": max_k}
        try:
            routing = _route(config, calibration, logits)
        except pv.ResolutionError:  # alpha beyond the null's resolution: refused before any work
            assert alpha < 1e-4, f"{config} refused"
            continue
        fdr, se = _fdp(routing, logits)
        assert fdr <= alpha + 4 * se + 1e-9, f"{config}: realised FDR {fdr:.4f} > alpha {alpha} (se {se:.4f})"
        checked += 1
    assert checked >= len(KNOB_VALUES["max_k"]) * 4  # most alphas are reachable


def _oracle_counts(p: np.ndarray, alpha: float, procedure: str) -> np.ndarray:
    method = {"bh": "fdr_bh", "by": "fdr_by"}[procedure]
    return np.array([multipletests(row, alpha=alpha, method=method)[0].sum() for row in p])


@pytest.mark.parametrize("model", pv.PVALUE_MODELS)
def test_selection_equals_statsmodels_under_every_knob(model):
    """Router counts = clamp(statsmodels' rejections, min_k, max_k) and its first min(R, max_k)
    experts are the R rejected ones, for every procedure, preset alpha, k range and temperature;
    min_k and weights_temperature never change the test's discoveries."""
    calibration, logits = _simulation()
    logits = logits[:300]
    temperatures = KNOB_VALUES["temperature"] if model in pv.TEMPERATURE_MODELS else [1.0]
    alphas = [a for a in KNOB_VALUES["alpha"] if a >= 1e-3]  # below: ResolutionError (checked above)
    for procedure, alpha, temperature in product(PROCEDURES, alphas, temperatures):
        base = {"strategy": procedure, "pvalues": model, "alpha": alpha, "temperature": temperature}
        p = pv.build_pvalue_model(model, temperature, calibration)(logits, 0).double().numpy()
        rejected = _oracle_counts(p, alpha, procedure)
        for min_k, max_k, weights_t in product(KNOB_VALUES["min_k"] + [0], KNOB_VALUES["max_k"],
                                               KNOB_VALUES["weights_temperature"][::2]):
            if min_k > max_k:
                continue
            routing = _route({**base, "min_k": min_k, "max_k": max_k, "weights_temperature": weights_t},
                             calibration, logits)
            expected = np.clip(rejected, min_k, max_k)
            assert np.array_equal(routing.counts.numpy(), expected), (base, min_k, max_k)
            tested = np.minimum(rejected, max_k)
            for t in np.flatnonzero(tested)[:50]:
                chosen = set(routing.indices[t, :tested[t]].tolist())
                assert chosen <= set(np.flatnonzero(p[t] <= np.sort(p[t])[rejected[t] - 1]))
        weights = _route({**base, "weights_temperature": 2.0}, calibration, logits).weights
        plain = _route(base, calibration, logits)
        expected_w = torch.softmax(logits / 2.0, dim=-1).gather(1, plain.indices) * plain.mask
        torch.testing.assert_close(weights, expected_w)


def test_heuristic_pvalues_are_never_zero():
    """zscore at z = 17.7 (a real OLMoE row) and beyond, softmax at tiny T: in (0, 1], order kept."""
    row = torch.zeros(1, NUM_EXPERTS)
    row[0, :3] = torch.tensor([40.0, 30.0, 20.0])
    row[0, 3:] = torch.linspace(-1, 1, NUM_EXPERTS - 3)
    for model, temperature in (("zscore", 1.0), ("softmax", 0.01), ("softmax", 1e-4)):
        p = pv.build_pvalue_model(model, temperature)(row, None)
        assert (p > 0).all() and (p <= 1).all(), (model, temperature)
        routing = build_router({"strategy": "bh", "pvalues": model, "temperature": temperature, "min_k": 3,
                                "max_k": 3})(row)
        assert routing.indices[0].tolist() == [0, 1, 2]  # ties at the clamp go to the larger logit


# --------------------------------------------------------------------------- (b) the bundled model


@pytest.fixture(scope="module")
def held_out():
    """(calibration from the WikiText calibration articles, router logits of evaluation articles)."""
    if not TINY.exists():
        pytest.skip("the bundled tiny OLMoE is not in this checkout")
    from bh_routing.data import wikitext_detokenize, wikitext_split
    from bh_routing.models import load_model
    from bh_routing.patching import collect_router_logits
    torch.manual_seed(0)
    model, tokenizer = load_model("tiny", device="cpu", dtype="fp32")
    calibration, _ = ex.calibrate(model, tokenizer, max_tokens=16384)
    text = "".join(wikitext_detokenize(d["page"]) for d in wikitext_split("evaluation").records[:8])
    ids = tokenizer(text, verbose=False)["input_ids"][:8192]
    windows = [torch.tensor(ids[i:i + 512])[None] for i in range(0, len(ids), 512)]
    with torch.no_grad():
        logits = collect_router_logits(model, windows, max_tokens=8192)
    return calibration, logits


@pytest.mark.slow
@pytest.mark.parametrize("model", pv.PVALUE_MODELS)
def test_held_out_null_pvalues_are_uniform_or_conservative(held_out, model):
    calibration, logits = held_out
    for temperature in KNOB_VALUES["temperature"] if model in pv.TEMPERATURE_MODELS else [1.0]:
        layers, _ = calibration_quality(logits, calibration, model, temperature=temperature)
        assert len(layers) == len(logits) and (layers["n_null"] == logits[0].shape[0] * (NUM_EXPERTS - TOP_K)).all()
        where = f"{model} T={temperature}\n{layers.round(4).to_string()}"
        if model in pv.CALIBRATED:  # their claim is uniformity; the heuristic scores only need the tail
            assert (layers["ks_excess"] <= 0.02).all(), where
        for q in ("0.01", "0.05"):
            assert (layers[f"ratio@{q}"] <= 1.25).all(), where
        assert (layers["ratio@0.001"] <= 1.6).all(), where


@pytest.mark.slow
def test_held_out_fdr_of_every_preset_config(held_out):
    calibration, logits = held_out
    logits = [x[:4096] for x in logits]
    settings = {(c["strategy"], c["pvalues"], c["alpha"], c["max_k"], c["temperature"]) for c in CONFIGS}
    checked = 0
    for procedure, model, alpha, max_k, temperature in sorted(settings):
        config = {"strategy": procedure, "pvalues": model, "alpha": alpha, "max_k": max_k, "temperature": temperature}
        try:
            fdp = false_discovery_proportion(config, logits, calibration)
        except pv.ResolutionError:
            continue
        # the test's discoveries: FDR <= alpha up to sampling error (4096 tokens per layer)
        assert max(fdp) <= alpha + 0.01, f"{config}: held-out FDR per layer {np.round(fdp, 4)}"
        checked += 1
    assert checked >= 20
