"""Prompts under a routing: teacher-forced scores, greedy continuations, their statistics, and an
interleaved timing of several routings.

One path for every prompt run (notebook 02, the sweep's ``prompts`` task):

* :func:`score_prompts` — each prompt scored by the evaluation engine (``evaluation.score_requests``)
  as lm-eval scores a rolling document: the prompt's tokens (HFLM tokenisation) after the prefix token
  (BOS, else EOS), so the model reads ``[prefix, t_1 … t_{n-1}]`` and predicts ``t_1 … t_n``; per
  token the experts each layer used at the reading position. With ``new_tokens`` > 0 all prompts are
  then continued greedily in one left-padded batch under the same routing.
* :func:`prompt_statistics` — experts per token and expert load of a :class:`PromptScores`
  (``bh_routing.analysis``).
* :func:`time_routings` — tokens/s of greedy generation per routing: a warm-up, then rounds that
  cycle through the routings (the only timing a report shows).
* the tables a sweep report makes of its prompt runs and of `latency.json`.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from . import analysis
from .evaluation import encode, make_request, prefix_token_id, resolve_max_length, rolling_windows, score_requests

LATENCY_FILE = "latency.json"  # a prompt sweep's interleaved timing, in its folder


@dataclass
class PromptScores:
    """One routing's prompts: per prompt (``table``: id, category, n_tokens, nll, mean_experts,
    floor_rate, ceiling_rate; with generation also continuation, mean_experts_prompt,
    mean_experts_generated) and per token read in the teacher-forced pass (``tokens[id]`` = decoded
    pieces, ``counts[id]`` = [L, T] experts per layer, ``experts[id]`` = [L, T, K] chosen experts,
    -1 padded). Token j of a prompt is the token read at the position that predicts its token j + 1:
    the prefix token, then the prompt's tokens but its last. ``generation``: seconds, generated
    tokens and tokens/s of the one batched ``generate`` (a single, unwarmed timing)."""
    label: str
    config: dict
    table: pd.DataFrame
    tokens: dict[str, list[str]]
    counts: dict[str, np.ndarray]
    experts: dict[str, np.ndarray]
    min_k: int
    max_k: int
    generation: dict = field(default_factory=dict)

    def load(self, num_experts: int) -> np.ndarray:
        """[L, N] assignments per expert over all prompts."""
        return sum(analysis.load_counts(e, num_experts) for e in self.experts.values())


def routing_patch(model, routing: Mapping, calibration=None, record: bool = True):
    """A RoutingPatch (not applied) for a build_router config or ``{"per_layer": {layer: config}}``;
    every router is built here, so a bad config fails before any work."""
    from .patching import RoutingPatch
    if "per_layer" in routing:
        layers = {int(layer): dict(cfg) for layer, cfg in routing["per_layer"].items()}
        return RoutingPatch(model, None, layers=layers, calibration=calibration, record=record, verbose=False)
    return RoutingPatch(model, dict(routing), calibration=calibration, record=record, verbose=False)


def _check_prompts(prompts) -> list[Mapping]:
    prompts = list(prompts) if not isinstance(prompts, (str, bytes, Mapping)) else None
    if not prompts or not all(isinstance(p, Mapping) and isinstance(p.get("prompt"), str) and "id" in p
                              for p in prompts):
        raise ValueError("prompts must be a non-empty list of records {'id', 'prompt'[, 'category']} "
                         "(e.g. bh_routing.prompt_sets.prompt_set('baseline'))")
    ids = [p["id"] for p in prompts]
    if len(set(ids)) != len(ids):
        raise ValueError(f"prompt ids must be unique, got {ids}")
    return prompts


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix_token_id(tokenizer)


def _limits(patch) -> tuple[np.ndarray, np.ndarray]:
    """([L, 1] min_k, [L, 1] max_k) of the patch's layers, in recorder row order."""
    return (np.array([[patch.routers[layer].min_k] for layer in patch.layers]),
            np.array([[patch.routers[layer].max_k] for layer in patch.layers]))


@torch.no_grad()
def score_prompts(model, tokenizer, prompts: Sequence[Mapping[str, str]], config: Mapping, calibration=None,
                  label: str | None = None, new_tokens: int = 0, progress: bool = True) -> PromptScores:
    """Each prompt teacher-forced under ``config`` (patch mode) by the evaluation engine, as lm-eval
    scores a rolling document (module docstring): ``nll`` (mean negative log-likelihood per predicted
    token, nats; ``n_tokens`` of them), ``mean_experts``, ``floor_rate``, ``ceiling_rate``; with
    ``new_tokens`` > 0 the greedy continuation of every prompt, generated in one left-padded batch
    under the same routing, and the mean experts on its prompt and on its generated tokens."""
    from tqdm.auto import tqdm
    prompts = _check_prompts(prompts)
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, (int, np.integer)) or new_tokens < 0:
        raise ValueError(f"new_tokens must be a whole number >= 0, got {new_tokens!r}")
    patch = routing_patch(model, config, calibration)
    encoded = encode(tokenizer, [p["prompt"] for p in prompts])
    empty = [p["id"] for p, ids in zip(prompts, encoded) if not ids]
    if empty:
        raise ValueError(f"prompts {empty} encode to no tokens: give them some text")
    max_length, prefix, pad = resolve_max_length(model, tokenizer), prefix_token_id(tokenizer), _pad_id(tokenizer)
    min_k, max_k = _limits(patch)
    rows, tokens, counts, experts = [], {}, {}, {}
    with patch:
        for prompt, ids in zip(tqdm(prompts, desc=label or "prompts", unit="prompt", disable=not progress), encoded):
            logprobs, read, count, chosen = [], [], [], []
            for window, (context, continuation) in enumerate(rolling_windows(ids, prefix, max_length)):
                request = make_request(0, window, context, continuation, max_length)
                # one request per call: the recorder then holds exactly this window's forward pass
                scores = score_requests(model, [request], batch_size=1, pad_token_id=pad, recorder=patch.recorder)
                arrays = patch.recorder.arrays()
                n = request.n_scored
                logprobs.append(scores.logprobs)
                read += request.tokens[-n - 1:-1]                     # the tokens at the predicting positions
                count.append(scores.experts.T.astype(np.int64))      # [L, n], the engine's recorder output
                chosen.append(arrays["experts"][:, -n:].astype(np.int64))  # [L, n, K]
            count, chosen = np.concatenate(count, axis=1), _join_experts(chosen)
            logprob = np.concatenate(logprobs).astype(np.float64)
            rows.append({"id": prompt["id"], "category": prompt.get("category", ""), "n_tokens": len(logprob),
                         "nll": float(-logprob.mean()), "mean_experts": float(count.mean()),
                         "floor_rate": float((count == min_k).mean()), "ceiling_rate": float((count == max_k).mean())})
            tokens[prompt["id"]] = [tokenizer.decode([int(t)]) for t in read]
            counts[prompt["id"]], experts[prompt["id"]] = count, chosen
        generation = {}
        if new_tokens:
            patch.recorder.clear()
            continuations, generation = _generate(model, tokenizer, encoded, new_tokens, patch.recorder)
            for row, continuation in zip(rows, continuations):
                row.update(continuation)
    return PromptScores(label or str(dict(config)), dict(config), pd.DataFrame(rows), tokens, counts, experts,
                        int(min_k.min()), int(max_k.max()), generation)


def _join_experts(parts: Sequence[np.ndarray]) -> np.ndarray:
    """[L, T_i, K_i] chosen-expert arrays -> [L, ΣT_i, max K_i], short rows padded with -1."""
    width = max(part.shape[2] for part in parts)
    return np.concatenate([np.pad(part, ((0, 0), (0, 0), (0, width - part.shape[2])), constant_values=-1)
                           for part in parts], axis=1)


def _left_padded(encoded: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, W], attention_mask [B, W]) with every prompt right-aligned."""
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for b, ids in enumerate(encoded):
        input_ids[b, width - len(ids):] = torch.tensor(ids)
        mask[b, width - len(ids):] = 1
    return input_ids.to(device), mask.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_batch(model, tokenizer, encoded: Sequence[Sequence[int]], new_tokens: int,
                   exact_length: bool = False) -> tuple[torch.Tensor, int, float]:
    """Greedy continuations of token lists in one left-padded batch (lm-eval's generate_until input:
    the prompt's tokens, no prefix token) -> (output [B, W + new], prompt width W, seconds).
    ``exact_length``: no early stop at EOS, so every routing generates the same number of tokens."""
    device = next(model.parameters()).device
    input_ids, mask = _left_padded(encoded, _pad_id(tokenizer), device)
    _sync(device)
    started = time.perf_counter()
    output = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                            min_new_tokens=new_tokens if exact_length else None, pad_token_id=_pad_id(tokenizer))
    _sync(device)
    return output, input_ids.shape[1], time.perf_counter() - started


def _generate(model, tokenizer, encoded, new_tokens: int, recorder) -> tuple[list[dict], dict]:
    """Per prompt: continuation text and mean experts on its prompt / generated tokens (those the
    model read before the first EOS); and the generate call's single timing."""
    output, width, seconds = generate_batch(model, tokenizer, encoded, new_tokens)
    read, per_token = recorder.tokens(), recorder.counts().mean(axis=0)        # per token: mean over layers
    eos = tokenizer.eos_token_id
    rows = []
    for b in range(len(encoded)):
        generated = output[b, width:].tolist()
        n_before_eos = generated.index(eos) if eos in generated else len(generated)
        mine = (read["batch"] == b).to_numpy()
        prefill = mine & (read["phase"] == "prefill").to_numpy()
        decoded = mine & ~prefill & (read["position"].to_numpy() - width < n_before_eos)
        rows.append({"continuation": tokenizer.decode(generated, skip_special_tokens=True),
                     "mean_experts_prompt": float(per_token[prefill].mean()),
                     "mean_experts_generated": float(per_token[decoded].mean()) if decoded.any() else None})
    generated_tokens = int(output[:, width:].numel())
    return rows, {"seconds": seconds, "generated_tokens": generated_tokens, "tokens_per_s": generated_tokens / seconds,
                  "timing": "one generate call, not warmed up (see time_routings)"}


# --------------------------------------------------------------------------- statistics


def prompt_statistics(scores: PromptScores, num_experts: int) -> dict:
    """Experts per token and expert load over every teacher-forced token of every prompt (the same
    tokens under any routing, so configurations compare on equal text): ``n_prompts``, ``n_tokens``;
    ``experts_mean/std/min/max`` over tokens of each token's experts averaged over layers;
    ``layer_mean_min/max`` (the range of the per-layer means) and ``mean_experts_per_layer``;
    ``load_cv`` and ``load_max_min_ratio`` (per layer over the N experts' assignment counts, then
    the mean over layers; the ratio is inf when an expert got no token), ``load_cv_per_layer``,
    ``dead_experts`` (summed over layers); ``floor_rate``/``ceiling_rate`` over (layer, token)."""
    ids = list(scores.counts)
    counts = np.concatenate([scores.counts[i] for i in ids], axis=1)             # [L, T]
    chosen = _join_experts([scores.experts[i] for i in ids])                      # [L, T, K]
    per = analysis.experts_per_token(counts)
    over_tokens = analysis.describe(per["per_token"])
    layer_means = per["per_layer"]["mean"].to_numpy(float)
    load = analysis.load_metrics(analysis.load_counts(chosen, num_experts))      # each [L]
    table = scores.table.set_index("id").loc[ids]
    weights = table["n_tokens"].to_numpy(float)   # each prompt's rate is over its L x n_tokens counts
    return {"n_prompts": len(ids), "n_tokens": int(counts.shape[1]),
            "experts_mean": over_tokens["mean"], "experts_std": over_tokens["std"],
            "experts_min": over_tokens["min"], "experts_max": over_tokens["max"],
            "layer_mean_min": float(layer_means.min()), "layer_mean_max": float(layer_means.max()),
            "mean_experts_per_layer": layer_means.tolist(),
            "load_cv": float(load["cv"].mean()), "load_max_min_ratio": float(load["max_min_ratio"].mean()),
            "load_cv_per_layer": load["cv"].tolist(), "dead_experts": int(load["dead_experts"].sum()),
            "floor_rate": float(np.average(table["floor_rate"], weights=weights)),
            "ceiling_rate": float(np.average(table["ceiling_rate"], weights=weights))}


def compare_prompts(baseline: PromptScores, candidate: PromptScores,
                    metrics: Sequence[str] = ("mean_experts", "nll")) -> pd.DataFrame:
    """Paired comparison (unit = prompt) of ``candidate`` vs ``baseline`` for each metric:
    :func:`bh_routing.analysis.paired_comparison` (paired t, Wilcoxon, Cohen's d_z, 95 % CI)."""
    merged = baseline.table.merge(candidate.table, on="id", suffixes=("_baseline", "_candidate"))
    rows = []
    for metric in metrics:
        test = analysis.paired_comparison(merged[f"{metric}_baseline"], merged[f"{metric}_candidate"], unit="prompt")
        rows.append({"metric": metric, "baseline": baseline.label, "candidate": candidate.label,
                     **{k: v for k, v in test.items() if k not in ("notes", "difference")},
                     "notes": "; ".join(test["notes"])})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- interleaved timing


def machine() -> dict:
    """Where a timing ran: host, CPU, torch threads, device."""
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


@torch.no_grad()
def time_routings(model, tokenizer, configs: Mapping[str, Mapping], calibration=None,
                  prompts: Sequence[Mapping[str, str]] | None = None, new_tokens: int = 16, repeats: int = 3) -> dict:
    """Tokens/s of greedy generation (every prompt in one left-padded batch, exactly ``new_tokens``
    each) per routing in ``configs`` ({label: routing}): one recorded warm-up call per routing (its
    mean experts per token), then ``repeats`` rounds, each timing every routing once, the order
    rotated by one each round; the median over rounds per routing. Returns a JSON-able dict with the
    machine, each round's order and seconds, and per routing the tokens/s of every round."""
    from .prompt_sets import prompt_set
    if not configs:
        raise ValueError("configs is empty: pass {label: routing config} of the routings to time")
    for name, value in (("new_tokens", new_tokens), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    prompts = _check_prompts(prompt_set("categories") if prompts is None else prompts)
    encoded = encode(tokenizer, [p["prompt"] for p in prompts])
    labels = list(configs)
    patches = {label: routing_patch(model, configs[label], calibration) for label in labels}   # all checked first
    mean_experts = {}
    for label in labels:                                          # warm-up, recorded
        with patches[label] as patch:
            generate_batch(model, tokenizer, encoded, new_tokens, exact_length=True)
            mean_experts[label] = float(patch.recorder.counts().mean())
    rounds = []
    for r in range(repeats):
        order = labels[r % len(labels):] + labels[:r % len(labels)]
        seconds = {}
        for label in order:
            with routing_patch(model, configs[label], calibration, record=False):
                _, _, seconds[label] = generate_batch(model, tokenizer, encoded, new_tokens, exact_length=True)
        rounds.append({"order": order, "seconds": seconds})
    generated = len(prompts) * new_tokens
    results = []
    for label in labels:
        rates = [generated / round_["seconds"][label] for round_ in rounds]
        results.append({"label": label, "routing": dict(configs[label]),
                        "strategy": configs[label].get("strategy"), "mean_experts": mean_experts[label],
                        "tokens_per_s": rates, "median_tokens_per_s": float(np.median(rates)),
                        "median_ms_per_token": 1000.0 / float(np.median(rates))})
    return {"method": f"greedy generation of {new_tokens} tokens for each of {len(prompts)} prompts in one "
                      f"left-padded batch; one warm-up call per routing, then {repeats} interleaved rounds "
                      "(order rotated each round); median over rounds",
            "new_tokens": new_tokens, "n_prompts": len(prompts), "repeats": repeats,
            "device": str(next(model.parameters()).device), "dtype": str(next(model.parameters()).dtype),
            "machine": machine(), "rounds": rounds, "configs": results}


# =========================================================================== tables of a sweep's prompt runs


def prompts_table(records: list[dict]) -> pd.DataFrame:
    rows = [{"label": r["label"], **p} for r in records if r["task"] == "prompts" and r["status"] == "ok"
            for p in r["prompts"]]
    return pd.DataFrame(rows)


PROMPT_STATS_COLUMNS = ("n_prompts", "n_tokens", "experts_mean", "experts_std", "experts_min", "experts_max",
                        "layer_mean_min", "layer_mean_max", "load_cv", "load_max_min_ratio", "dead_experts",
                        "floor_rate", "ceiling_rate")


def prompt_stats_table(records: list[dict]) -> pd.DataFrame:
    """One row per prompt-suite run: label, strategy and its ``prompt_stats``
    (``prompts.prompt_statistics``; runs recorded before those were saved are left out)."""
    rows = [{"label": r["label"], "strategy": r.get("strategy"),
             **{key: r["prompt_stats"].get(key) for key in PROMPT_STATS_COLUMNS}}
            for r in records if r["task"] == "prompts" and r["status"] == "ok" and "prompt_stats" in r]
    return pd.DataFrame(rows)


def load_cv_per_layer(records: list[dict]) -> pd.DataFrame:
    """label, layer, cv: the expert-load CV of every layer of every prompt-suite run."""
    return pd.DataFrame([{"label": r["label"], "layer": layer, "cv": cv}
                         for r in records if r["task"] == "prompts" and r["status"] == "ok" and "prompt_stats" in r
                         for layer, cv in enumerate(r["prompt_stats"]["load_cv_per_layer"])])


def read_latency(folder: Path, context: dict) -> tuple[dict | None, str | None]:
    """(the folder's ``latency.json``, None), or (None, why it is not used): absent, or timed on
    another model, weights, dtype or calibration than the report's runs."""
    path = folder / LATENCY_FILE
    if not path.exists():
        return None, None
    latency = json.loads(path.read_text())
    timed = json.loads(json.dumps(latency.get("context") or {}, sort_keys=True, default=str))
    ours = json.loads(json.dumps(context, sort_keys=True, default=str))
    differs = sorted(key for key in set(timed) & set(ours) if timed[key] != ours[key])
    if differs:
        return None, f"{LATENCY_FILE} was timed in another context ({', '.join(differs)} differ): not shown"
    return latency, None


def latency_table(latency: dict | None) -> pd.DataFrame:
    """One row per timed routing: label, strategy, mean experts, median tokens/s and ms per token."""
    if not latency:
        return pd.DataFrame()
    frame = pd.DataFrame(latency["configs"])
    frame["rounds"] = frame["tokens_per_s"].map(len)
    return frame.rename(columns={"median_ms_per_token": "ms_per_token"})[
        ["label", "strategy", "mean_experts", "median_tokens_per_s", "ms_per_token", "rounds"]]
