"""The native router observed (notebook 01): router logits recorded on text of several kinds,
per-layer statistics, weight concentration, expert usage, co-activation, specialisation by text
source, a token-level view, and the readings computed from them."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .session import progress_bar as _progress

# =========================================================================== native routing (notebook 01)


@dataclass
class RoutingSample:
    """Native router logits recorded on text, with where each token came from.

    ``logits[layer]`` is [T, N] float32 on the CPU (padding removed); ``token_ids``, ``source``,
    ``text``, ``position`` are [T] — the token, its source label, the index of its text (window)
    among all recorded texts, and its position in that text.
    """
    logits: list[torch.Tensor]
    token_ids: np.ndarray
    source: np.ndarray
    text: np.ndarray
    position: np.ndarray
    top_k: int

    @property
    def num_layers(self) -> int:
        return len(self.logits)

    @property
    def num_experts(self) -> int:
        return int(self.logits[0].shape[1])

    @property
    def num_tokens(self) -> int:
        return int(self.logits[0].shape[0])

    @property
    def sources(self) -> list[str]:
        return list(dict.fromkeys(self.source.tolist()))

    def select(self, keep) -> "RoutingSample":
        keep = np.asarray(keep)
        index = torch.as_tensor(np.flatnonzero(keep) if keep.dtype == bool else keep)
        return RoutingSample([layer[index] for layer in self.logits], self.token_ids[index], self.source[index],
                             self.text[index], self.position[index], self.top_k)

    def native_indices(self) -> np.ndarray:
        """[L, T, k] the native top-k experts (softmax then top-k, as the model routes)."""
        return np.stack([torch.topk(torch.softmax(layer, dim=-1), self.top_k, dim=-1).indices.numpy()
                         for layer in self.logits])


def domain_sample() -> dict[str, list[str]]:
    """The held-out validation documents shipped with the bundled tiny model (four domains:
    encyclopedia, biomedical, math, code; never trained on) as {domain: [text, ...]}; empty when the
    tiny model is not installed. Plain text, usable with any model."""
    import gzip
    from .models import TINY_MODEL_DIR
    path = Path(TINY_MODEL_DIR) / "validation_sample.jsonl.gz"
    if not path.is_file():
        return {}
    out: dict[str, list[str]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                out.setdefault(row["domain"], []).append(row["text"])
    return out


def text_sources(tokens_per_source: int, source: str = "auto", domains: bool = True) -> dict[str, list[str]]:
    """Text of different kinds, each enough for ``tokens_per_source`` tokens where available: from
    the evaluation data (bundled copies offline, the hub online) WikiText-2 articles that calibration
    never sees (encyclopedic), HellaSwag contexts with their correct ending (everyday activities),
    LAMBADA passages (fiction); with ``domains``, the held-out documents of four domains shipped with
    the tiny model (:func:`domain_sample`); and the prompt sets' prompts, grouped by category
    (the domain prompts one by one)."""
    from . import data
    from .prompt_sets import prompt_set
    docs = data.wikitext_split("evaluation", source).records
    n_docs = max(1, min(len(docs), math.ceil(tokens_per_source / 2000)))
    hellaswag = data.load_hellaswag(source, n=max(4, math.ceil(tokens_per_source / 30)))
    lambada = data.load_lambada(source, n=max(4, math.ceil(tokens_per_source / 60)))
    prompts = prompt_set("categories")
    texts = {
        "WikiText (encyclopedia)": [data.wikitext_detokenize(d["page"]).strip() for d in docs[:n_docs]],
        "HellaSwag (everyday)": [f"{r['ctx']} {r['endings'][r['label']]}" for r in hellaswag],
        "LAMBADA (fiction)": [r["text"] for r in lambada],
    }
    if domains:
        texts.update({f"held-out {name}": items for name, items in domain_sample().items()})
    for p in prompts:
        if p["category"] == "domain":
            texts[f"prompt: {p['id'].split('-', 1)[1]}"] = [p["prompt"]]
        else:
            texts.setdefault(f"prompt: {p['category']}", []).append(p["prompt"])
    return texts


@torch.no_grad()
def record_native_routing(model, tokenizer, texts: Mapping[str, Sequence[str]], max_length: int = 512,
                          max_tokens_per_source: int | None = None, batch_size: int = 8,
                          progress: bool = True) -> RoutingSample:
    """Router logits of the model's *native* routing on ``texts`` ({source: [text, ...]}).

    Each text is tokenised, cut into windows of ``max_length`` tokens, and at most
    ``max_tokens_per_source`` tokens per source are kept (whole windows first). Windows are run in
    batches of ``batch_size`` with right padding; padding never reaches the sample.
    """
    from .patching import collect_router_logits, find_moe_blocks
    top_k = find_moe_blocks(model)[0].top_k
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    windows: list[tuple[str, list[int]]] = []
    for name, items in texts.items():
        budget = max_tokens_per_source
        for text in items:
            ids = tokenizer(text, verbose=False)["input_ids"]   # windowed below
            for start in range(0, len(ids), max_length):
                piece = ids[start:start + max_length]
                if budget is not None:
                    piece = piece[:budget]
                    budget -= len(piece)
                if len(piece) >= 2:
                    windows.append((name, piece))
                if budget is not None and budget <= 0:
                    break
            if budget is not None and budget <= 0:
                break
    if not windows:
        raise ValueError("no text to record: every source was empty")
    chunks: list[list[torch.Tensor]] = []
    batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
    for batch in _progress(batches, progress, "recording native routing", "batch"):
        width = max(len(ids) for _, ids in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (_, ids) in enumerate(batch):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            mask[row, :len(ids)] = 1
        chunks.append(collect_router_logits(model, [{"input_ids": input_ids.to(device),
                                                     "attention_mask": mask.to(device)}]))
    logits = [torch.cat([chunk[layer] for chunk in chunks]) for layer in range(len(chunks[0]))]
    token_ids = np.concatenate([ids for _, ids in windows]).astype(np.int64)
    source = np.concatenate([[name] * len(ids) for name, ids in windows]).astype(object)
    text = np.concatenate([[i] * len(ids) for i, (_, ids) in enumerate(windows)]).astype(np.int64)
    position = np.concatenate([np.arange(len(ids)) for _, ids in windows]).astype(np.int64)
    if logits[0].shape[0] != token_ids.size:
        raise RuntimeError(f"recorded {logits[0].shape[0]} tokens for {token_ids.size} real tokens")
    return RoutingSample(logits, token_ids, source, text, position, top_k)


def _entropy_nats(probs: torch.Tensor) -> torch.Tensor:
    logp = torch.log(probs.clamp(min=torch.finfo(probs.dtype).tiny))
    return -(probs * logp).sum(dim=-1)


def routing_statistics(sample: RoutingSample) -> pd.DataFrame:
    """One row per layer of the native router:

    ``tokens``; ``max_weight_mean``/``max_weight_median`` (the top-1 softmax probability — the largest
    mixing weight, OLMoE does not renormalise); ``entropy_nats`` (mean per-token routing entropy) and
    ``entropy_norm`` (÷ log N: 1 = uniform); ``topk_mass`` (mean probability mass of the native top-k)
    and ``mass_left_out`` = 1 − topk_mass; ``top_expert`` (the expert most often in the top-k) and
    ``top_expert_usage`` (share of tokens routed to it; uniform = k/N); ``top1_expert`` (most frequent
    top-1) and ``top1_share``; ``load_cv`` (std/mean of the top-k load over experts), ``load_gini``,
    ``dead_experts`` (never in any token's top-k); ``logit_mean``/``logit_std`` (all router logits).
    """
    from . import analysis
    rows = []
    indices = sample.native_indices()
    load = analysis.load_counts(indices, sample.num_experts)
    balance = analysis.load_metrics(load)
    for layer, logits in enumerate(sample.logits):
        probs = torch.softmax(logits.double(), dim=-1)
        top = torch.topk(probs, sample.top_k, dim=-1).values
        entropy = _entropy_nats(probs)
        top1 = indices[layer][:, 0]
        top1_counts = np.bincount(top1, minlength=sample.num_experts)
        rows.append({
            "layer": layer, "tokens": logits.shape[0],
            "max_weight_mean": float(top[:, 0].mean()), "max_weight_median": float(np.median(top[:, 0].numpy())),
            "entropy_nats": float(entropy.mean()), "entropy_norm": float(entropy.mean() / math.log(sample.num_experts)),
            "topk_mass": float(top.sum(dim=1).mean()), "mass_left_out": float(1 - top.sum(dim=1).mean()),
            "top_expert": int(load[layer].argmax()), "top_expert_usage": float(load[layer].max() / logits.shape[0]),
            "top1_expert": int(top1_counts.argmax()), "top1_share": float(top1_counts.max() / logits.shape[0]),
            "load_cv": float(balance["cv"][layer]), "load_gini": float(balance["gini"][layer]),
            "dead_experts": int(balance["dead_experts"][layer]),
            "logit_mean": float(logits.double().mean()), "logit_std": float(logits.double().std()),
        })
    return pd.DataFrame(rows)


def concentration(sample: RoutingSample, ks: Sequence[int] = (1, 2, 4, 8)) -> pd.DataFrame:
    """Weight concentration: per layer and k, the mean share of the router's probability mass in the
    k most probable experts (``mass``; uniform routing would give k/N) — long format."""
    rows = []
    for layer, logits in enumerate(sample.logits):
        cumulative = torch.sort(torch.softmax(logits.double(), dim=-1), dim=-1, descending=True).values.cumsum(dim=-1)
        for k in ks:
            rows.append({"layer": layer, "k": k, "mass": float(cumulative[:, k - 1].mean()),
                         "mass_median": float(np.median(cumulative[:, k - 1].numpy())), "uniform": k / sample.num_experts})
    return pd.DataFrame(rows)


def expert_usage(sample: RoutingSample) -> np.ndarray:
    """[L, N] how many tokens each expert was routed (native top-k)."""
    from . import analysis
    return analysis.load_counts(sample.native_indices(), sample.num_experts)


def coactivation_pairs(sample: RoutingSample, layer: int, n: int = 10, min_tokens: int | None = None) -> pd.DataFrame:
    """The expert pairs of one layer chosen together most beyond chance: ``together`` (tokens with both
    in the top-k), ``jaccard`` (together / tokens with either) and ``lift`` = P(i and j) / (P(i) P(j))
    (1 = independent). Pairs with fewer than ``min_tokens`` (default max(5, 0.5 % of tokens)) are left
    out; sorted by lift."""
    from . import analysis
    indices = sample.native_indices()[layer]
    tokens = indices.shape[0]
    together = analysis.coactivation(indices, sample.num_experts)[0]
    load = np.diagonal(together).copy()
    i, j = np.triu_indices(sample.num_experts, k=1)
    frame = pd.DataFrame({"layer": layer, "expert_i": i, "expert_j": j, "together": together[i, j].astype(int),
                          "load_i": load[i].astype(int), "load_j": load[j].astype(int)})
    frame["jaccard"] = frame["together"] / (frame["load_i"] + frame["load_j"] - frame["together"]).clip(lower=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        frame["lift"] = frame["together"] * tokens / (frame["load_i"] * frame["load_j"])
    floor = max(5, math.ceil(0.005 * tokens)) if min_tokens is None else min_tokens
    frame = frame[frame["together"] >= floor]
    return frame.sort_values(["lift", "together"], ascending=False).head(n).reset_index(drop=True)


def domain_usage(sample: RoutingSample, layer: int, indices: np.ndarray | None = None,
                 min_tokens: int = 0) -> pd.DataFrame:
    """source × expert: share of the source's top-k assignments that go to each expert in ``layer``
    (rows sum to 1); the last row ``all`` pools every source. Sources with fewer than ``min_tokens``
    tokens (a 25-token prompt) are left out: their usage is noise, not specialisation.
    ``indices``: ``sample.native_indices()`` if already computed."""
    indices = (sample.native_indices() if indices is None else indices)[layer]  # [T, k]
    rows = {}
    kept = [name for name in sample.sources if (sample.source == name).sum() >= min_tokens]
    for name in kept + ["all"]:
        mine = indices if name == "all" else indices[sample.source == name]
        counts = np.bincount(mine.ravel(), minlength=sample.num_experts).astype(np.float64)
        rows[name] = counts / max(counts.sum(), 1)
    return pd.DataFrame.from_dict(rows, orient="index", columns=range(sample.num_experts))


def _mutual_information_bits(labels: np.ndarray, experts: np.ndarray, num_experts: int) -> float:
    """I(label; expert) in bits from paired samples (plug-in estimate)."""
    codes, names = pd.factorize(labels)
    joint = np.zeros((len(names), num_experts))
    np.add.at(joint, (codes, experts), 1.0)
    joint /= joint.sum()
    p_label, p_expert = joint.sum(axis=1, keepdims=True), joint.sum(axis=0, keepdims=True)
    nonzero = joint > 0
    return float((joint[nonzero] * np.log2(joint[nonzero] / (p_label @ p_expert)[nonzero])).sum())


def domain_specialisation(sample: RoutingSample, min_tokens: int = 32, seed: int = 0) -> pd.DataFrame:
    """Per layer, how much the chosen experts say about the text's source: the mutual information
    I(source; expert) in bits over all top-k assignments of sources with at least ``min_tokens``
    tokens, the same with the source labels shuffled across tokens (``mi_shuffled``: what finite
    samples give by chance), and ``mi_norm`` = MI / H(source) (0 = none, 1 = the expert identifies
    the source)."""
    counts = pd.Series(sample.source).value_counts()
    keep = np.isin(sample.source, counts[counts >= min_tokens].index)
    if keep.sum() == 0 or counts[counts >= min_tokens].size < 2:
        raise ValueError(f"domain specialisation needs at least two sources with >= {min_tokens} tokens")
    sub = sample.select(keep)
    indices = sub.native_indices()  # [L, T, k]
    labels = np.repeat(sub.source, sub.top_k)
    shuffled = np.repeat(np.random.default_rng(seed).permutation(sub.source), sub.top_k)
    shares = pd.Series(sub.source).value_counts(normalize=True).to_numpy()
    h_source = float(-(shares * np.log2(shares)).sum())
    rows = []
    for layer in range(sub.num_layers):
        experts = indices[layer].ravel()
        mi = _mutual_information_bits(labels, experts, sub.num_experts)
        rows.append({"layer": layer, "sources": int(len(shares)), "tokens": int(sub.num_tokens), "mi_bits": mi,
                     "mi_shuffled_bits": _mutual_information_bits(shuffled, experts, sub.num_experts),
                     "mi_norm": mi / h_source if h_source > 0 else np.nan})
    return pd.DataFrame(rows)


def specialised_experts(sample: RoutingSample, n: int = 10, min_tokens: int = 32, min_share: float = 0.02) -> pd.DataFrame:
    """The (layer, expert, source) triples with the largest lift = P(expert | source) / P(expert),
    among sources with >= ``min_tokens`` tokens and experts taking >= ``min_share`` of the source's
    assignments (so a lift is not one token's accident)."""
    counts = pd.Series(sample.source).value_counts()
    names = [s for s in sample.sources if counts[s] >= min_tokens]
    rows = []
    sub = sample.select(np.isin(sample.source, names))
    indices = sub.native_indices() if names else None
    for layer in range(sample.num_layers if names else 0):
        usage = domain_usage(sub, layer, indices)
        overall = usage.loc["all"]
        for name in names:
            share = usage.loc[name]
            for expert in np.flatnonzero(share.to_numpy() >= min_share):
                rows.append({"layer": layer, "expert": int(expert), "source": name, "share_in_source": float(share[expert]),
                             "share_overall": float(overall[expert]),
                             "lift": float(share[expert] / overall[expert]) if overall[expert] > 0 else np.inf})
    frame = pd.DataFrame(rows, columns=["layer", "expert", "source", "share_in_source", "share_overall", "lift"])
    return frame.sort_values("lift", ascending=False).head(n).reset_index(drop=True)


def token_view(sample: RoutingSample, tokenizer, text: int) -> pd.DataFrame:
    """One recorded text, token by token and layer by layer (long format): ``position``, ``token``
    (decoded piece), ``layer``, ``top1_expert``, ``top1_prob``, ``entropy_norm``, ``topk_mass``,
    ``experts`` (the native top-k, most probable first)."""
    keep = np.flatnonzero(sample.text == text)
    if keep.size == 0:
        raise ValueError(f"text {text} was not recorded")
    pieces = [tokenizer.decode([int(t)]) for t in sample.token_ids[keep]]
    rows = []
    for layer, logits in enumerate(sample.logits):
        probs = torch.softmax(logits[torch.as_tensor(keep)].double(), dim=-1)
        top = torch.topk(probs, sample.top_k, dim=-1)
        entropy = _entropy_nats(probs) / math.log(sample.num_experts)
        for i, position in enumerate(sample.position[keep]):
            rows.append({"position": int(position), "token": pieces[i], "layer": layer,
                         "top1_expert": int(top.indices[i, 0]), "top1_prob": float(top.values[i, 0]),
                         "entropy_norm": float(entropy[i]), "topk_mass": float(top.values[i].sum()),
                         "experts": top.indices[i].tolist()})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- readings (computed text)


def describe_baseline(stats: pd.DataFrame, conc: pd.DataFrame, spec: pd.DataFrame | None, num_experts: int,
                      top_k: int, model_id: str | None = None) -> list[str]:
    """Key observations of notebook 01 as sentences, every number from the tables given; the first
    names the model they are about (the bundled one as what it is)."""
    uniform_top1, uniform_mass = 1 / num_experts, top_k / num_experts
    first, last = stats.iloc[0], stats.iloc[-1]
    peak = stats.loc[stats["max_weight_mean"].idxmax()]
    flat = stats.loc[stats["entropy_norm"].idxmax()]
    lines = [
        f"The largest mixing weight averages {stats['max_weight_mean'].mean():.3f} over layers (range "
        f"{stats['max_weight_mean'].min():.3f}–{stats['max_weight_mean'].max():.3f}), "
        f"{stats['max_weight_mean'].mean() / uniform_top1:.1f}× the {uniform_top1:.3f} of uniform routing.",
        f"The native top-{top_k} carry {stats['topk_mass'].mean():.1%} of the probability mass on average "
        f"(uniform: {uniform_mass:.1%}), so {stats['mass_left_out'].mean():.1%} is left out; the most is left out "
        f"in layer {int(stats.loc[stats['mass_left_out'].idxmax(), 'layer'])} "
        f"({stats['mass_left_out'].max():.1%}).",
        f"Routing entropy is {stats['entropy_norm'].mean():.2f} of its maximum log {num_experts} on average; "
        f"the flattest layer is {int(flat['layer'])} ({flat['entropy_norm']:.2f}), the most peaked "
        f"{int(peak['layer'])} (top-1 weight {peak['max_weight_mean']:.3f}); from the first to the last layer "
        f"entropy goes {first['entropy_norm']:.2f} → {last['entropy_norm']:.2f}.",
    ]
    if model_id is not None:
        from .models import describe_model
        lines.insert(0, f"Model: {describe_model(model_id)}; every observation below is about this model.")
    top1 = conc[conc["k"] == 1]["mass"].mean()
    half = conc[conc["k"] == max(1, top_k // 2)]["mass"].mean()
    lines.append(f"Concentration: the top-1 expert holds {top1:.1%} of the mass, the top-{max(1, top_k // 2)} "
                 f"{half:.1%}, the top-{top_k} {stats['topk_mass'].mean():.1%} (layer means).")
    busiest = stats.loc[stats["top_expert_usage"].idxmax()]
    lines.append(f"Expert load: the busiest expert of a layer serves up to {busiest['top_expert_usage']:.1%} of "
                 f"tokens (layer {int(busiest['layer'])}, expert {int(busiest['top_expert'])}; balanced load would be "
                 f"{uniform_mass:.1%}); load CV ranges {stats['load_cv'].min():.2f}–{stats['load_cv'].max():.2f}, and "
                 f"{int(stats['dead_experts'].sum())} (layer, expert) pairs were never chosen on this sample.")
    if spec is not None and len(spec):
        best = spec.loc[spec["mi_bits"].idxmax()]
        lines.append(f"Specialisation by text source: the chosen experts carry {spec['mi_bits'].mean():.3f} bits "
                     f"about the source on average (chance level with shuffled labels "
                     f"{spec['mi_shuffled_bits'].mean():.3f}); strongest in layer {int(best['layer'])} "
                     f"({best['mi_bits']:.3f} bits, {best['mi_norm']:.1%} of the source entropy).")
    return lines


# =========================================================================== readings (Markdown)


def describe_sample(sample: RoutingSample) -> str:
    counts = ", ".join(f"{name} ({(sample.source == name).sum():,})" for name in sample.sources)
    return (f"Recorded **{sample.num_tokens:,} tokens** × {sample.num_layers} MoE layers × "
            f"{sample.num_experts} experts (native top-{sample.top_k}) from {len(sample.sources)} sources: "
            f"{counts}.")


def describe_logits(sample: RoutingSample, stats: pd.DataFrame) -> str:
    """Spread of the router logits, the top-1's lead over the median logit, and the top-1
    probability against a uniform router."""
    gap = [float((l.max(dim=1).values - l.median(dim=1).values).mean()) for l in sample.logits]
    std, top1 = stats["logit_std"], stats["max_weight_median"]
    return (f"Router logits have a standard deviation of {std.min():.2f}–{std.max():.2f} per layer; a token's "
            f"top-1 logit lies on average {min(gap):.2f}–{max(gap):.2f} above its median logit. After the "
            f"softmax the top-1 probability has a median of {top1.min():.3f}–{top1.max():.3f} per layer, "
            f"against {1 / sample.num_experts:.3f} for a uniform router.")


def describe_usage(usage: np.ndarray, num_tokens: int) -> str:
    """``usage``: [layers, experts] tokens routed (:func:`expert_usage`)."""
    relative = usage / usage.mean(axis=1, keepdims=True)
    layer, expert = np.unravel_index(relative.argmax(), relative.shape)
    return (f"The busiest (layer, expert) is layer {layer}, expert {expert}, at {relative.max():.1f}× its "
            f"layer's mean load; {int((usage == 0).sum())} of {usage.size} (layer, expert) pairs were never "
            f"chosen on these {num_tokens:,} tokens, and {int((relative < 0.25).sum())} get less than a "
            "quarter of the mean load.")


def describe_entropy(stats: pd.DataFrame) -> str:
    entropy = stats["entropy_norm"]
    return (f"Mean normalised entropy per layer: {', '.join(f'{e:.2f}' for e in entropy)} (layers "
            f"0–{len(stats) - 1}). The flattest layer is {int(stats.loc[entropy.idxmax(), 'layer'])}, "
            f"the most decisive {int(stats.loc[entropy.idxmin(), 'layer'])}.")


def describe_mass_left_out(stats: pd.DataFrame, top_k: int) -> str:
    worst = stats.loc[stats["mass_left_out"].idxmax()]
    return (f"The top-{top_k} leave out {stats['mass_left_out'].mean():.1%} of the routing probability on "
            f"average (layer {int(worst['layer'])}: {worst['mass_left_out']:.1%}). Because OLMoE does not "
            f"renormalise, the mixing weights of a token sum to its top-{top_k} mass, "
            f"{stats['topk_mass'].mean():.2f} on average, not 1.")


def describe_pairs(pairs: pd.DataFrame, layer: int) -> str:
    """The strongest pair of :func:`coactivation_pairs` (empty when there is none)."""
    if pairs.empty:
        return ""
    top = pairs.iloc[0]
    return (f"Strongest pair in layer {layer}: experts {int(top['expert_i'])} and {int(top['expert_j'])}, "
            f"chosen together for {int(top['together'])} tokens, {top['lift']:.1f}× what independent "
            "choices would give.")


def describe_specialisation(spec: pd.DataFrame, specific: pd.DataFrame) -> str:
    """``spec``: :func:`domain_specialisation`; ``specific``: :func:`specialised_experts`."""
    best_layer = int(spec.loc[spec["mi_bits"].idxmax(), "layer"])
    text = (f"I(source; expert) ranges {spec['mi_bits'].min():.3f}–{spec['mi_bits'].max():.3f} bits over "
            f"layers (chance level {spec['mi_shuffled_bits'].mean():.3f}); the most specialised layer is "
            f"{best_layer}.")
    if len(specific):
        top = specific.iloc[0]
        text += (f" The most specific expert: layer {int(top['layer'])}, expert {int(top['expert'])}, which "
                 f"{top['source']} uses {top['lift']:.1f}× as often as text overall.")
    return text


def token_views(sample: RoutingSample, tokenizer, sources: Sequence[str]) -> pd.DataFrame:
    """:func:`token_view` of the first text of each of ``sources`` that was recorded, with a
    ``source`` column."""
    views = [token_view(sample, tokenizer, int(sample.text[sample.source == name][0])).assign(source=name)
             for name in sources if name in sample.sources]
    return pd.concat(views, ignore_index=True) if views else pd.DataFrame(columns=["source"])


def describe_token_views(views: pd.DataFrame) -> str:
    """The tokens the router is most and least decided on, by top-1 probability averaged over layers."""
    if views.empty:
        return ""
    per_token = views.groupby(["source", "position", "token"], sort=False)["top1_prob"].mean().reset_index()
    sure, unsure = per_token.loc[per_token["top1_prob"].idxmax()], per_token.loc[per_token["top1_prob"].idxmin()]
    return (f"Across layers the router is most decided on {sure['token']!r} ({sure['source']}, mean top-1 "
            f"probability {sure['top1_prob']:.3f}) and least on {unsure['token']!r} ({unsure['source']}, "
            f"{unsure['top1_prob']:.3f}).")


def describe_domains(token_perplexity: float, domains: pd.DataFrame, top_k: int) -> str:
    """``domains``: :func:`bh_routing.report_tables.per_domain` of the native evaluation."""
    per = ", ".join(f"{r.domain} {r.token_perplexity:.4g}" for r in domains.itertuples())
    return (f"Native top-{top_k}: token perplexity {token_perplexity:.4g} over "
            f"{int(domains['tokens'].sum()):,} held-out tokens; by domain {per}.")
