"""Notebook 01's sections: each computes native-router statistics (:mod:`bh_routing.native_routing`),
then shows its figures, tables and readings through the notebook's
:class:`bh_routing.session.Session`, which keeps them for the report and the summary JSON."""
from __future__ import annotations

import numpy as np
import pandas as pd

from . import native_routing as native
from . import routing_plots as rplots

STATS_COLUMNS = ["layer", "max_weight_mean", "max_weight_median", "entropy_nats", "entropy_norm", "topk_mass",
                 "mass_left_out", "top_expert", "top_expert_usage", "top1_expert", "top1_share", "load_cv",
                 "load_gini", "dead_experts"]
TOKEN_VIEW_SOURCES = ("prompt: simple", "prompt: complex", "prompt: code")


def record(session, model, tokenizer):
    """Native routing recorded on the budget's sample of every text source (its description shown)."""
    sample = native.record_native_routing(model, tokenizer, native.text_sources(session.sample_tokens),
                                          max_length=512, max_tokens_per_source=session.sample_tokens,
                                          batch_size=session.batch_size(512))
    session.say(native.describe_sample(sample))
    session.keep(tokens=sample.num_tokens)
    return sample


def show_router_logits(session, sample) -> pd.DataFrame:
    """Router logits and the top-1 probability per layer; returns the per-layer statistics."""
    stats = native.routing_statistics(sample)
    session.figure(rplots.plot_logit_distributions(sample, session.subtitle), "router_logits",
                   "Router logits (all experts vs the top-1) and the top-1 probability per layer.")
    session.say(native.describe_logits(sample, stats))
    session.keep(per_layer=stats)
    return stats


def show_layer_statistics(session, stats: pd.DataFrame) -> None:
    session.table(stats, "Per-layer statistics", STATS_COLUMNS, digits=3, csv="baseline_routing_stats")


def show_usage(session, sample) -> None:
    """Expert load per layer (native top-k)."""
    usage = native.expert_usage(sample)  # [L, N] tokens routed
    pd.DataFrame(usage).add_prefix("expert_").rename_axis("layer").to_csv(session.folder / "expert_usage.csv")
    session.figure(rplots.plot_expert_utilization(usage, subtitle=session.subtitle), "expert_usage_heatmap",
                   "Expert usage per layer, relative to the layer's mean load (1 = uniform, 0 = never chosen).")
    session.say(native.describe_usage(usage, sample.num_tokens))


def show_entropy(session, sample, stats: pd.DataFrame) -> None:
    session.figure(rplots.plot_entropy_across_layers(sample, session.subtitle), "entropy_across_layers",
                   "Normalised routing entropy per layer (median and bands over tokens) and the mean top-1 "
                   "probability.")
    session.say(native.describe_entropy(stats))


def show_concentration(session, sample, ks=(1, 2, 4, 8)) -> pd.DataFrame:
    """How much of the routing mass the top-k experts hold, per layer."""
    conc = native.concentration(sample, ks=ks)
    conc.to_csv(session.folder / "weight_concentration.csv", index=False)
    session.figure(rplots.plot_concentration(conc, session.subtitle), "weight_concentration",
                   "Share of the routing mass in the top-1/2/4/8 experts per layer (dotted: uniform router).")
    table = conc.pivot(index="layer", columns="k", values="mass")
    session.table(table.rename(columns=lambda k: f"top-{k} mass").reset_index(), "Weight concentration", digits=3)
    return conc


def show_mass_left_out(session, sample, stats: pd.DataFrame) -> None:
    session.figure(rplots.plot_mass_left_out(sample, session.subtitle), "mass_left_out",
                   "Routing probability mass outside the native top-8, per layer.")
    session.say(native.describe_mass_left_out(stats, sample.top_k))


def show_coactivation(session, sample) -> pd.DataFrame:
    """Which experts are chosen together (Jaccard) in the middle layer, and the top pairs."""
    from .analysis import coactivation
    layer = sample.num_layers // 2
    jaccard = coactivation(sample.native_indices()[layer], sample.num_experts, normalize="jaccard")[0]
    np.fill_diagonal(jaccard, np.nan)  # [N, N]; an expert with itself says nothing
    session.figure(rplots.plot_coactivation(jaccard, subtitle=session.subtitle,
                                           title=f"Expert co-activation (Jaccard), layer {layer}"),
                   "coactivation", "Expert co-activation (Jaccard) in the middle layer.")
    pairs = session.table(native.coactivation_pairs(sample, layer, n=10), "Co-activation", digits=3,
                          csv="coactivation_pairs")
    session.say(native.describe_pairs(pairs, layer))
    return pairs


def show_specialisation(session, sample) -> pd.DataFrame:
    """Mutual information between text source and expert per layer, the most specialised layer's
    per-source usage, and the most source-specific experts (text corpora only, not the prompts)."""
    min_tokens = min(256, session.sample_tokens // 2)
    spec = native.domain_specialisation(sample, min_tokens=min_tokens, seed=session.seed)
    spec.to_csv(session.folder / "domain_specialisation.csv", index=False)
    session.figure(rplots.plot_specialisation(spec, session.subtitle), "specialisation",
                   "Mutual information between text source and chosen expert per layer, with chance level.")
    best = int(spec.loc[spec["mi_bits"].idxmax(), "layer"])
    session.figure(rplots.plot_domain_usage(native.domain_usage(sample, best, min_tokens=min_tokens), best,
                                            session.subtitle), "domain_usage",
                   "Per-source expert usage in the most specialised layer (log2 lift over all text).")
    specific = session.table(native.specialised_experts(sample, n=10, min_tokens=min_tokens),
                             "Most specific experts", digits=3)
    session.say(native.describe_specialisation(spec, specific))
    session.keep(specialisation=spec)
    return spec


def show_token_views(session, sample, tokenizer) -> None:
    """Token by token: the top-1 probability and expert in every layer, for the three prompt types."""
    views = native.token_views(sample, tokenizer, TOKEN_VIEW_SOURCES)
    views.to_csv(session.folder / "token_view.csv", index=False)
    for name, view in views.groupby("source", sort=False):
        session.figure(rplots.plot_token_view(view, subtitle=f"{session.subtitle} · {name}"),
                       f"token_view_{name.split(': ')[1]}",
                       "Token-level routing: top-1 probability and top-1 expert per token and layer.")
    session.say(native.describe_token_views(views))


def show_calibration(session, model, tokenizer):
    """The calibration the three notebooks share (loaded or made now), and its resolution."""
    from .session import calibration_summary, describe_calibration, load_or_calibrate
    calibration, _, _ = load_or_calibrate(session, model, tokenizer)  # says how, keeps its metadata
    table = session.table(calibration_summary(calibration), "Calibration: resolution per layer", digits=3,
                          csv="calibration_summary")
    session.say(describe_calibration(calibration, table))
    return calibration


def show_domains(session, model, tokenizer, top_k: int) -> pd.DataFrame:
    """Native perplexity on held-out text of each domain (the evaluator's ``domains`` task)."""
    from . import evaluation as ev
    from .report_tables import per_domain
    result = ev.evaluate(model, tokenizer, "domains", max_length=min(1024, ev.resolve_max_length(model, tokenizer)))
    table = session.table(per_domain(result), "Held-out domain text", digits=4)
    session.say(native.describe_domains(result.metrics["token_perplexity"], table, top_k))
    return table


def show_observations(session, sample, stats, conc, spec) -> list[str]:
    """The key observations, computed from this run's statistics."""
    lines = native.describe_baseline(stats, conc, spec, sample.num_experts, sample.top_k, model_id=session.model_id)
    session.say(lines, "Key observations", lead=True)
    session.keep(observations=lines)
    return lines
