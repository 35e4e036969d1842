"""Routing metrics and paired statistics, on plain NumPy / pandas inputs.

Nothing here imports torch or the recorder: every function takes arrays, so it works on a
``RoutingRecorder``'s output, on a saved run, or on synthetic data alike.

Array conventions (L = MoE layers, T = tokens, K = slots per token, N = experts)
-------------------------------------------------------------------------------
* ``counts``  int [L, T] (or [T] = one layer): experts chosen per token and layer. Negative values
  (the recorder's -1) mean "this layer did not record this token" and are left out everywhere.
* ``indices`` int [L, T, K] (or [T, K]): chosen experts. Which slots are real is decided by, in
  order: ``mask`` bool [L, T, K] if given, else ``slot < counts`` if ``counts`` is given, else
  ``index >= 0`` (the recorder pads with -1; a :class:`~bh_routing.selection.Routing` pads with
  PAD_INDEX = 0, so pass its ``mask`` or ``counts``). Negative indices are never real.
  Real slots of one token are assumed to hold distinct experts (every strategy guarantees it).
* ``native_indices`` int [L, T, k_native]: the native router's top-k for the same tokens (e.g.
  :func:`native_topk` of the recorded router logits).

Paired statistics report their *unit of pairing* (prompt, token, document, ...) in every result:
a p-value over 10,000 tokens of 20 prompts is not a p-value over 20 independent prompts.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import optimize, stats

# --------------------------------------------------------------------------- input handling


def _as_counts(counts) -> np.ndarray:
    c = np.asarray(counts)
    if c.ndim == 1:
        c = c[None, :]
    if c.ndim != 2 or not np.issubdtype(c.dtype, np.integer):
        raise ValueError(f"counts must be an integer [layers, tokens] (or [tokens]) array, got {c.dtype} {c.shape}")
    return c.astype(np.int64)


def _layer_ids(layers, num_layers: int) -> np.ndarray:
    ids = np.arange(num_layers) if layers is None else np.asarray(layers)
    if len(ids) != num_layers:
        raise ValueError(f"layers has {len(ids)} ids for {num_layers} layers of data")
    return ids


def _as_indices(indices) -> np.ndarray:
    idx = np.asarray(indices)
    if idx.ndim == 2:
        idx = idx[None]
    if idx.ndim != 3 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"indices must be an integer [layers, tokens, slots] (or [tokens, slots]) array, "
                         f"got {idx.dtype} {idx.shape}")
    return idx.astype(np.int64)


def real_slots(indices, mask=None, counts=None) -> tuple[np.ndarray, np.ndarray]:
    """(indices [L, T, K] int64, real [L, T, K] bool) following the module's slot conventions."""
    idx = _as_indices(indices)
    if mask is not None:
        real = np.asarray(mask, dtype=bool).reshape(idx.shape)
    elif counts is not None:
        c = _as_counts(counts)
        real = np.arange(idx.shape[2])[None, None, :] < c[:, :, None]
    else:
        real = np.ones(idx.shape, dtype=bool)
    return idx, real & (idx >= 0)


def _valid_tokens(shape: tuple[int, int], counts) -> np.ndarray:
    """[L, T] True where the layer recorded the token (counts >= 0; all tokens without counts)."""
    return np.ones(shape, dtype=bool) if counts is None else _as_counts(counts) >= 0


def describe(values) -> dict:
    """n, mean, std (sample, ddof=1; NaN for n < 2), min, max, median of a 1-D array."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return dict(n=0, mean=np.nan, std=np.nan, min=np.nan, max=np.nan, median=np.nan)
    return dict(n=int(v.size), mean=float(v.mean()), std=float(v.std(ddof=1)) if v.size > 1 else np.nan,
                min=float(v.min()), max=float(v.max()), median=float(np.median(v)))


_AGGREGATES = dict(n="size", mean="mean", std="std", min="min", max="max", median="median")


def native_topk(router_logits, k: int = 8) -> np.ndarray:
    """[..., k] indices of the k largest logits along the last axis, descending (ties: lower index).
    Softmax is monotone, so this is the native top-k set of a softmax-then-top-k router."""
    logits = np.asarray(router_logits, dtype=np.float64)
    return np.argsort(-logits, axis=-1, kind="stable")[..., :k]


# --------------------------------------------------------------------------- experts per token


def experts_per_token(counts, positions=None, layers=None) -> dict:
    """How many experts tokens use.

    Returns a dict with
    * ``overall``: :func:`describe` of every recorded (layer, token) count;
    * ``per_layer``: DataFrame ``layer, n, mean, std, min, max, median``;
    * ``per_position``: DataFrame ``position, n, mean, ...`` pooled over layers (None without
      ``positions`` [T], e.g. the recorder's ``tokens()["position"]``);
    * ``per_token``: [T] mean count over the layers that recorded each token (NaN if none) — the
      per-token values to pair between two runs on the same tokens.
    """
    c = _as_counts(counts)
    valid = c >= 0
    layer_of = np.broadcast_to(_layer_ids(layers, c.shape[0])[:, None], c.shape)
    long = pd.DataFrame({"layer": layer_of[valid], "experts": c[valid]})
    per_layer = long.groupby("layer")["experts"].agg(**_AGGREGATES).reset_index()
    per_position = None
    if positions is not None:
        pos = np.asarray(positions)
        if pos.shape != (c.shape[1],):
            raise ValueError(f"positions must be [tokens] = [{c.shape[1]}], got {pos.shape}")
        long["position"] = np.broadcast_to(pos[None, :], c.shape)[valid]
        per_position = long.groupby("position")["experts"].agg(**_AGGREGATES).reset_index()
    with np.errstate(invalid="ignore", divide="ignore"):
        per_token = np.where(valid, c, 0).sum(axis=0) / valid.sum(axis=0)
    return dict(overall=describe(c[valid]), per_layer=per_layer, per_position=per_position, per_token=per_token)


def floor_ceiling_rates(counts, min_k: int, max_k: int, layers=None) -> pd.DataFrame:
    """Per layer: ``layer, n, floor_rate`` (share of tokens with count == min_k) and ``ceiling_rate``
    (count == max_k). A high floor rate means the strategy is really "min_k experts"; for top-k
    (min_k == max_k) both rates are 1 by construction."""
    c = _as_counts(counts)
    valid = c >= 0
    n = valid.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        floor = ((c == min_k) & valid).sum(axis=1) / n
        ceiling = ((c == max_k) & valid).sum(axis=1) / n
    return pd.DataFrame({"layer": _layer_ids(layers, c.shape[0]), "n": n, "floor_rate": floor,
                         "ceiling_rate": ceiling})


# --------------------------------------------------------------------------- expert load


def load_counts(indices, num_experts: int, mask=None, counts=None) -> np.ndarray:
    """[L, N] int64: how many tokens each expert was routed in each layer."""
    idx, real = real_slots(indices, mask, counts)
    if idx[real].size and idx[real].max() >= num_experts:
        raise ValueError(f"expert index {idx[real].max()} out of range for num_experts={num_experts}")
    flat = idx + np.arange(idx.shape[0])[:, None, None] * num_experts  # one bincount for all layers
    return np.bincount(flat[real], minlength=idx.shape[0] * num_experts).reshape(idx.shape[0], num_experts)


def load_metrics(load) -> dict[str, np.ndarray]:
    """Balance metrics of expert loads ``[..., N]`` along the last axis (each [...]):

    * ``cv``: std / mean (population std: the N experts are the whole population);
    * ``max_min_ratio``: max / min load (inf when an expert is dead);
    * ``max_mean_ratio``: max / mean load (the usual imbalance factor; finite with dead experts);
    * ``gini``: sum_i (2i - N - 1) x_(i) / (N sum x), x ascending (0 = equal, (N-1)/N = one expert);
    * ``entropy``: of the load shares, in nats; ``entropy_normalised`` = entropy / log N (1 = equal);
    * ``dead_experts``: experts with load 0.
    All NaN (dead_experts N) for a layer with no load at all.
    """
    x = np.asarray(load, dtype=np.float64)
    n = x.shape[-1]
    total = x.sum(axis=-1)
    mean = total / n
    ranks = 2 * np.arange(1, n + 1) - n - 1
    with np.errstate(invalid="ignore", divide="ignore"):
        share = x / total[..., None]
        plogp = np.where(share > 0, share * np.log(np.where(share > 0, share, 1.0)), 0.0)
        entropy = np.where(total > 0, -plogp.sum(axis=-1), np.nan)
        return dict(
            cv=x.std(axis=-1) / mean,
            max_min_ratio=x.max(axis=-1) / x.min(axis=-1),
            max_mean_ratio=x.max(axis=-1) / mean,
            gini=(np.sort(x, axis=-1) * ranks).sum(axis=-1) / (n * total),
            entropy=entropy,
            entropy_normalised=entropy / math.log(n),
            dead_experts=(x == 0).sum(axis=-1),
        )


def expert_load(indices, num_experts: int, mask=None, counts=None, layers=None) -> pd.DataFrame:
    """Per layer: ``layer, assignments`` (sum of loads) and the :func:`load_metrics` columns
    ``cv, max_min_ratio, max_mean_ratio, gini, entropy, entropy_normalised, dead_experts``."""
    load = load_counts(indices, num_experts, mask, counts)
    frame = pd.DataFrame({"layer": _layer_ids(layers, load.shape[0]), "assignments": load.sum(axis=1)})
    for name, value in load_metrics(load).items():
        frame[name] = value
    return frame


def coactivation(indices, num_experts: int, mask=None, counts=None, normalize: str | None = None) -> np.ndarray:
    """[L, N, N] co-activation: entry (i, j) = number of tokens that chose both i and j in that layer
    (the diagonal is the load). ``normalize``: None (counts), ``"conditional"`` (row i:
    P(j chosen | i chosen); NaN rows for dead experts) or ``"jaccard"`` (|i and j| / |i or j|)."""
    idx, real = real_slots(indices, mask, counts)
    num_layers, num_tokens, _ = idx.shape
    out = np.zeros((num_layers, num_experts, num_experts))
    for layer in range(num_layers):  # a [T, N] membership matrix per layer bounds the memory
        member = np.zeros((num_tokens, num_experts))
        token = np.broadcast_to(np.arange(num_tokens)[:, None], idx.shape[1:])
        member[token[real[layer]], idx[layer][real[layer]]] = 1.0
        out[layer] = member.T @ member  # float64: exact for any realistic token count
    if normalize is None:
        return out
    load = np.diagonal(out, axis1=1, axis2=2)  # [L, N]
    with np.errstate(invalid="ignore", divide="ignore"):
        if normalize == "conditional":
            return out / load[:, :, None]
        if normalize == "jaccard":
            return out / (load[:, :, None] + load[:, None, :] - out)
    raise ValueError(f"normalize must be None, 'conditional' or 'jaccard', got {normalize!r}")


# --------------------------------------------------------------------------- overlap with native top-k


def overlap_per_token(indices, native_indices, mask=None, counts=None, native_mask=None) -> dict[str, np.ndarray]:
    """Per (layer, token), arrays [L, T]: ``intersection`` |S ∩ N|, ``chosen`` |S|, ``native`` |N|,
    ``recall`` |S ∩ N| / |N| (share of the native top-k kept), ``precision`` |S ∩ N| / |S| (share of
    the chosen experts that are native; NaN when nothing was chosen), ``jaccard``
    |S ∩ N| / |S ∪ N|, and ``valid`` (the layer recorded the token; see module docstring)."""
    idx, real = real_slots(indices, mask, counts)
    nat, nat_real = real_slots(native_indices, native_mask, None)
    if idx.shape[:2] != nat.shape[:2]:
        raise ValueError(f"indices {idx.shape} and native_indices {nat.shape} must share [layers, tokens]")
    intersection = np.zeros(idx.shape[:2], dtype=np.int64)
    for layer in range(idx.shape[0]):  # [T, K, k] comparisons per layer, not per token
        same = idx[layer][:, :, None] == nat[layer][:, None, :]
        same &= real[layer][:, :, None] & nat_real[layer][:, None, :]
        intersection[layer] = same.any(axis=2).sum(axis=1)
    chosen, native = real.sum(axis=2), nat_real.sum(axis=2)
    union = chosen + native - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        return dict(intersection=intersection, chosen=chosen, native=native,
                    recall=intersection / native, precision=intersection / chosen,
                    jaccard=intersection / union, valid=_valid_tokens(idx.shape[:2], counts))


def overlap_with_native(indices, native_indices, mask=None, counts=None, native_mask=None,
                        layers=None) -> pd.DataFrame:
    """Per layer: ``layer, n, recall, precision, jaccard`` — token means of
    :func:`overlap_per_token` over the recorded tokens (precision over tokens that chose any)."""
    per = overlap_per_token(indices, native_indices, mask, counts, native_mask)
    valid = per["valid"]
    frame = pd.DataFrame({"layer": _layer_ids(layers, valid.shape[0]), "n": valid.sum(axis=1)})
    for name in ("recall", "precision", "jaccard"):
        value = np.where(valid, per[name], np.nan)
        with np.errstate(invalid="ignore"):
            frame[name] = np.nanmean(value, axis=1) if value.size else np.nan
    return frame


# --------------------------------------------------------------------------- one flat record per run


def _json_number(x):
    """float for finite numbers, None for NaN/inf: strict JSON has neither."""
    x = float(x)
    return x if math.isfinite(x) else None


def summarize_routing(counts, indices=None, num_experts: int | None = None, mask=None, native_indices=None,
                      native_mask=None, min_k: int | None = None, max_k: int | None = None,
                      native_k: int | None = None) -> dict:
    """Flat, JSON-serialisable summary of one run (NaN/inf become None). Keys, where the inputs allow:

    ``n_layers, n_tokens, experts_mean/std/min/max/median`` (over every recorded (layer, token)),
    ``experts_mean_layer_min/max`` (range of the per-layer means), ``reduction_pct``
    (100 · (1 − mean / native_k); native_k defaults to native_indices' width), ``floor_rate,
    ceiling_rate`` (pooled), ``load_cv, load_gini, load_max_mean_ratio, load_entropy_normalised,
    dead_experts`` (means over layers), ``native_recall, native_precision, native_jaccard`` (pooled).
    """
    c = _as_counts(counts)
    valid = c >= 0
    out: dict = {"n_layers": int(c.shape[0]), "n_tokens": int(c.shape[1])}
    per_token = experts_per_token(c)
    for key, value in per_token["overall"].items():
        if key != "n":
            out[f"experts_{key}"] = value
    layer_means = per_token["per_layer"]["mean"]
    out["experts_mean_layer_min"] = layer_means.min() if len(layer_means) else np.nan
    out["experts_mean_layer_max"] = layer_means.max() if len(layer_means) else np.nan
    if native_k is None and native_indices is not None:
        native_k = _as_indices(native_indices).shape[2]
    if native_k:
        out["reduction_pct"] = 100.0 * (1.0 - out["experts_mean"] / native_k)
    if min_k is not None and max_k is not None:
        n = max(int(valid.sum()), 1)
        out["floor_rate"] = ((c == min_k) & valid).sum() / n
        out["ceiling_rate"] = ((c == max_k) & valid).sum() / n
    if indices is not None and num_experts is not None:
        load = expert_load(indices, num_experts, mask, c)
        for name in ("cv", "gini", "max_mean_ratio", "entropy_normalised"):
            out[f"load_{name}"] = load[name].mean()
        out["dead_experts"] = load["dead_experts"].mean()
    if indices is not None and native_indices is not None:
        per = overlap_per_token(indices, native_indices, mask, c, native_mask)
        for name in ("recall", "precision", "jaccard"):
            value = per[name][per["valid"]]
            with np.errstate(invalid="ignore"):
                out[f"native_{name}"] = np.nanmean(value) if np.isfinite(value).any() else np.nan
    return {k: (_json_number(v) if not isinstance(v, int) else v) for k, v in out.items()}


# --------------------------------------------------------------------------- paired statistics


def unit_means(values, units) -> pd.Series:
    """Mean of ``values`` per unit (prompt, document, ...), indexed by unit id in sorted order —
    turns per-token values into per-prompt values before a per-prompt paired test."""
    return pd.Series(np.asarray(values, dtype=np.float64)).groupby(np.asarray(units)).mean()


def mean_confidence_interval(values, confidence: float = 0.95) -> tuple[float, float]:
    """t-based CI of a mean: mean ± t_{(1+c)/2, n-1} · sd / sqrt(n)."""
    v = np.asarray(values, dtype=np.float64)
    n = v.size
    if n < 2:
        return (np.nan, np.nan)
    half = stats.t.ppf((1 + confidence) / 2, n - 1) * v.std(ddof=1) / math.sqrt(n)
    return (float(v.mean() - half), float(v.mean() + half))


def cohens_dz_interval(dz: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """CI of Cohen's d_z by inverting the noncentral t distribution of t = d_z · sqrt(n) with n − 1
    degrees of freedom (exact when the differences are normal; Steiger & Fouladi 1997)."""
    if n < 2 or not math.isfinite(dz):
        return (np.nan, np.nan)
    df, t_obs, tail = n - 1, dz * math.sqrt(n), (1 - confidence) / 2

    def solve(target):  # nct.cdf(t_obs; df, λ) falls monotonically in λ
        f = lambda lam: stats.nct.cdf(t_obs, df, lam) - target  # noqa: E731
        lo, hi, step = t_obs - 5.0, t_obs + 5.0, 5.0
        while f(lo) < 0:
            step *= 2
            lo -= step
        while f(hi) > 0:
            step *= 2
            hi += step
        try:
            return optimize.brentq(f, lo, hi, xtol=1e-10)
        except ValueError:  # scipy's noncentral-t CDF is NaN far in its tails (tiny n, large |d_z|)
            return np.nan
    return (solve(1 - tail) / math.sqrt(n), solve(tail) / math.sqrt(n))


def paired_comparison(baseline, candidate, unit: str = "prompt", confidence: float = 0.95) -> dict:
    """Compare paired measurements ``candidate`` vs ``baseline`` (same units, same order).

    Differences are **candidate − baseline**. Pairs with a NaN on either side are dropped
    (``n_dropped``). Returns a dict:
    ``unit`` (echoed: what one pair is), ``n``, ``n_dropped``, ``confidence``, ``mean_baseline``,
    ``mean_candidate``, ``mean_difference``, ``sd_difference``, ``ci_low``/``ci_high`` (t-based CI of
    the mean difference), ``t_statistic``/``t_pvalue`` (paired t-test, scipy.stats.ttest_rel,
    two-sided), ``wilcoxon_statistic``/``wilcoxon_pvalue`` (signed-rank, scipy.stats.wilcoxon,
    zero differences dropped as in Wilcoxon's original method; ``wilcoxon_n`` non-zero pairs),
    ``cohens_dz`` = mean / sd of the differences with ``dz_ci_low``/``dz_ci_high`` (noncentral t,
    see :func:`cohens_dz_interval`), and ``notes`` (degenerate cases, said rather than crashed on).
    """
    b = np.asarray(baseline, dtype=np.float64).ravel()
    c = np.asarray(candidate, dtype=np.float64).ravel()
    if b.shape != c.shape:
        raise ValueError(f"baseline and candidate must be paired (same length), got {b.size} and {c.size}")
    keep = ~(np.isnan(b) | np.isnan(c))
    b, c = b[keep], c[keep]
    n = b.size
    if n < 2:
        raise ValueError(f"a paired comparison needs at least 2 complete pairs, got {n}")
    diff = c - b
    mean, sd = float(diff.mean()), float(diff.std(ddof=1))
    notes: list[str] = []
    out = dict(unit=unit, n=n, n_dropped=int((~keep).sum()), confidence=confidence, difference="candidate - baseline",
               mean_baseline=float(b.mean()), mean_candidate=float(c.mean()), mean_difference=mean,
               sd_difference=sd)
    out["ci_low"], out["ci_high"] = mean_confidence_interval(diff, confidence)

    if sd == 0.0:  # scipy would warn and return NaN; say what happened instead
        if mean == 0.0:
            notes.append("all paired differences are zero: t-test, Wilcoxon and d_z are undefined")
            out.update(t_statistic=np.nan, t_pvalue=np.nan, cohens_dz=np.nan)
        else:
            notes.append("all paired differences are equal and non-zero: t and d_z are infinite")
            out.update(t_statistic=math.copysign(math.inf, mean), t_pvalue=0.0, cohens_dz=math.copysign(math.inf, mean))
    else:
        test = stats.ttest_rel(c, b)
        out.update(t_statistic=float(test.statistic), t_pvalue=float(test.pvalue), cohens_dz=mean / sd)
    out["dz_ci_low"], out["dz_ci_high"] = cohens_dz_interval(out["cohens_dz"], n, confidence)
    out["dz_ci_method"] = "noncentral t inversion"

    nonzero = int((diff != 0).sum())
    out["wilcoxon_n"] = nonzero
    if nonzero == 0:  # the note was added with the t-test above
        out.update(wilcoxon_statistic=np.nan, wilcoxon_pvalue=np.nan)
    else:
        try:
            test = stats.wilcoxon(diff)
            out.update(wilcoxon_statistic=float(test.statistic), wilcoxon_pvalue=float(test.pvalue))
        except ValueError as error:  # scipy's own refusals (too few pairs for its method, ...)
            out.update(wilcoxon_statistic=np.nan, wilcoxon_pvalue=np.nan)
            notes.append(f"Wilcoxon not computed: {error}")
        if nonzero < n:
            notes.append(f"Wilcoxon dropped {n - nonzero} zero differences")
    out["notes"] = notes
    return out


def bootstrap_perplexity_ratio(token_logprobs_baseline, token_logprobs_candidate, n_boot: int = 2000,
                               seed: int = 0, confidence: float = 0.95, groups=None, group_unit: str = "group",
                               max_block: int = 2**22) -> dict:
    """Paired bootstrap CI of the perplexity ratio candidate / baseline on the same tokens.

    ratio = exp(mean NLL_candidate − mean NLL_baseline) = PPL_candidate / PPL_baseline, from per-token
    log-likelihoods (natural log, [T] each, same tokens in the same order). Each resample draws the
    pairing unit with replacement, keeping both runs' values of a unit together:
    * ``groups=None``: unit = token (assumes tokens independent; CIs too narrow within documents);
    * ``groups`` [T] ids (document, prompt): unit = ``group_unit``; whole groups are resampled and
      the statistic is the token mean over the resampled tokens — robust to dependence within groups.
    Percentile CI of the ratio. Vectorised: resamples are drawn ``max(1, max_block // units)`` at a
    time (bounds memory; the same inputs, seed and max_block give the same result).

    Returns ``ratio, ci_low, ci_high, log_ratio, log_ratio_se`` (bootstrap SD), ``ppl_baseline,
    ppl_candidate, unit, n_units, n_tokens, n_boot, seed, confidence, method``.
    """
    lb = np.asarray(token_logprobs_baseline, dtype=np.float64).ravel()
    lc = np.asarray(token_logprobs_candidate, dtype=np.float64).ravel()
    if lb.shape != lc.shape or lb.size == 0:
        raise ValueError(f"need paired, non-empty per-token log-likelihoods, got {lb.size} and {lc.size}")
    if not (np.isfinite(lb).all() and np.isfinite(lc).all()):
        raise ValueError("per-token log-likelihoods must be finite (a -inf means a zero-probability token)")
    diff = lb - lc  # per token: NLL_candidate − NLL_baseline
    if groups is None:
        unit, sums, sizes = "token", diff, None
    else:
        codes, _ = pd.factorize(np.asarray(groups).ravel())
        if codes.shape != diff.shape:
            raise ValueError(f"groups must have one id per token ({diff.size}), got {codes.size}")
        unit, sums, sizes = group_unit, np.bincount(codes, weights=diff), np.bincount(codes).astype(np.float64)
    n_units = sums.size
    log_ratio = float(diff.mean())

    rng = np.random.default_rng(seed)
    boot = np.empty(n_boot)
    block = max(1, max_block // n_units)
    for start in range(0, n_boot, block):  # a loop per block of resamples, not per resample
        draw = rng.integers(0, n_units, size=(min(block, n_boot - start), n_units))
        total = sums[draw].sum(axis=1)
        boot[start:start + len(draw)] = total / (n_units if sizes is None else sizes[draw].sum(axis=1))
    ratios = np.exp(boot)
    tail = (1 - confidence) / 2
    low, high = np.quantile(ratios, [tail, 1 - tail])
    return dict(ratio=math.exp(log_ratio), ci_low=float(low), ci_high=float(high), log_ratio=log_ratio,
                log_ratio_se=float(boot.std(ddof=1)) if n_boot > 1 else np.nan,
                ppl_baseline=math.exp(-lb.mean()), ppl_candidate=math.exp(-lc.mean()),
                unit=unit, n_units=int(n_units), n_tokens=int(diff.size), n_boot=n_boot, seed=seed,
                confidence=confidence, method="paired percentile bootstrap")
