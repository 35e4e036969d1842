"""Sweeps: routing configurations × tasks × a budget, checkpointed so that a killed sweep resumes.

A :class:`Run` is data (label, routing config, task, budget); its ``run_id`` hashes the run *and* the
sweep context (model, dtype, calibration), so a folder never mixes runs of different models.
:func:`run_sweep` skips runs already in ``results.jsonl``, records a failing run (OOM, NaN, bad
config) with its error and goes on. Presets reproduce the seed notebooks' grids.

Calibration text: the last ``CALIBRATION_DOCS`` WikiText-2 test articles; WikiText evaluation uses
at most the first ``62 - CALIBRATION_DOCS`` articles, so no evaluated token was seen by calibration.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .pvalues import Calibration
from .selection import build_router
from .store import ResultStore, write_json

CALIBRATION_DOCS = 12
EVAL_WIKITEXT_DOCS = 62 - CALIBRATION_DOCS
TASKS = ("wikitext", "hellaswag", "lambada", "domains", "prompts")


@dataclass(frozen=True)
class Run:
    label: str
    routing: Mapping  # a build_router config, or {"per_layer": {layer: config}}
    task: str  # one of TASKS
    n: int | None = None  # items (WikiText: articles; prompts: all of the set)
    seed: int | None = None
    max_length: int | None = None
    new_tokens: int = 0  # prompts: greedy tokens generated per prompt
    group: str = ""  # what the run belongs to in a preset (e.g. "alpha", "matched k=4")

    def run_id(self, context: Mapping) -> str:
        blob = json.dumps({"run": asdict(self), "context": dict(context)}, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Budget:
    wikitext_docs: int | None
    hellaswag: int | None
    lambada: int | None
    max_length: int | None
    new_tokens: int

    def n_for(self, task: str) -> int | None:
        return {"wikitext": self.wikitext_docs, "hellaswag": self.hellaswag, "lambada": self.lambada}.get(task)


BUDGETS = {
    "smoke": Budget(wikitext_docs=1, hellaswag=8, lambada=8, max_length=128, new_tokens=4),  # tests, CI
    "demo": Budget(wikitext_docs=2, hellaswag=60, lambada=60, max_length=256, new_tokens=16),  # tiny model, 2 CPUs
    "colab": Budget(wikitext_docs=8, hellaswag=300, lambada=300, max_length=1024, new_tokens=50),  # OLMoE, free T4
    "full": Budget(wikitext_docs=EVAL_WIKITEXT_DOCS, hellaswag=None, lambada=None, max_length=None, new_tokens=50),
}

# --------------------------------------------------------------------------- matched compute

KNOBS = {  # strategy -> (knob, low, high, log-scale search, mean k increases with the knob)
    "bh": ("alpha", 1e-6, 1.0, True, True),
    "by": ("alpha", 1e-6, 1.0, True, True),
    "top_p": ("p", 1e-4, 1.0, False, True),
    "threshold": ("tau", 0.0, 0.999, False, False),
    "ratio": ("beta", 1e-4, 1.0, True, False),
}


def mean_experts(config: Mapping, router_logits: Sequence[torch.Tensor], calibration: Calibration | None = None,
                 layers: Sequence[int] | None = None) -> float:
    """Mean experts per token (over tokens and ``layers``) that ``config`` selects on recorded logits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # p-value resolution warnings are expected at search extremes
        try:
            router = build_router(config, calibration)
        except ValueError as error:
            if "can never select" in str(error):  # alpha below the p-value resolution: the floor
                return float(config.get("min_k", 1))
            raise
        layers = range(len(router_logits)) if layers is None else layers
        return float(np.mean([router(router_logits[l], l).counts.float().mean().item() for l in layers]))


def calibrate_to_mean_k(config: Mapping, target_k: float, router_logits: Sequence[torch.Tensor],
                        calibration: Calibration | None = None, per_layer: bool = False,
                        iterations: int = 30) -> dict:
    """Find the knob (α, p, τ, β) with which ``config`` uses ``target_k`` experts per token on the
    calibration logits (``router_logits[layer]`` [T, N]), globally or per layer. Returns the config
    (or ``{"per_layer": {layer: config}}``) with ``achieved_k`` recorded under ``"calibrated"``."""
    strategy = config["strategy"]
    if strategy not in KNOBS:
        raise ValueError(f"calibrate_to_mean_k supports {sorted(KNOBS)}, not {strategy!r}")
    if per_layer:
        return {"per_layer": {layer: calibrate_to_mean_k_layers(config, target_k, router_logits, calibration, [layer],
                                                                iterations) for layer in range(len(router_logits))},
                "strategy": strategy, "target_k": target_k}
    return calibrate_to_mean_k_layers(config, target_k, router_logits, calibration, None, iterations)


def calibrate_to_mean_k_layers(config, target_k, router_logits, calibration, layers, iterations) -> dict:
    knob, low, high, log_scale, increasing = KNOBS[config["strategy"]]
    best = None
    for _ in range(iterations):  # bisection on a monotone map knob -> mean k
        mid = math.sqrt(low * high) if log_scale and low > 0 else (low + high) / 2
        candidate = {**config, knob: mid}
        k = mean_experts(candidate, router_logits, calibration, layers)
        if best is None or abs(k - target_k) < abs(best[1] - target_k):
            best = (candidate, k)
        if (k < target_k) == increasing:
            low = mid
        else:
            high = mid
    candidate, k = best
    return {**candidate, "calibrated": {"target_k": target_k, "achieved_k": round(k, 4), "knob": knob}}


# --------------------------------------------------------------------------- presets


def _adaptive_settings() -> list[tuple[str, dict]]:
    return ([(f"top_p {p}", {"strategy": "top_p", "p": p}) for p in (0.1, 0.2, 0.3, 0.45)]
            + [(f"threshold {t}", {"strategy": "threshold", "tau": t}) for t in (0.1, 0.06, 0.04, 0.02)]
            + [(f"ratio {b}", {"strategy": "ratio", "beta": b}) for b in (0.8, 0.5, 0.3, 0.1)]
            + [("entropy 1-8", {"strategy": "entropy"})])


def full_experiments(budget: Budget, tasks: Sequence[str] = ("wikitext", "hellaswag", "lambada")) -> list[Run]:
    configs: list[tuple[str, str, dict]] = []
    for k in (2, 4, 6, 8):
        configs += [("top-k", f"top-{k}", {"strategy": "topk", "k": k}),
                    ("normalized", f"normalized top-{k}", {"strategy": "topk_renorm", "k": k}),
                    ("uniform", f"uniform top-{k}", {"strategy": "topk_uniform", "k": k}),
                    ("adaptive", f"BH α=0.05 max_k={k}", {"strategy": "bh", "alpha": 0.05, "max_k": k})]
    configs += [("bh max_k", f"BH α=0.05 max_k={m}", {"strategy": "bh", "alpha": 0.05, "max_k": m}) for m in (16, 32, 64)]
    configs += [("bh alpha", f"BH α={a} max_k=8", {"strategy": "bh", "alpha": a, "max_k": 8}) for a in (0.01, 0.10)]
    configs += [("other adaptive", label, cfg) for label, cfg in _adaptive_settings()]
    return [Run(label, cfg, task, budget.n_for(task), max_length=budget.max_length, group=group)
            for task in tasks for group, label, cfg in configs]


def bh_deep_dive(budget: Budget, task: str = "wikitext") -> list[Run]:
    runs = [Run("native top-8", {"strategy": "topk", "k": 8}, task, budget.n_for(task), max_length=budget.max_length,
                group="baseline")]
    for model in ("softmax", "pooled", "empirical", "zscore"):
        runs += [Run(f"BH {model} α={a}", {"strategy": "bh", "pvalues": model, "alpha": a}, task, budget.n_for(task),
                     max_length=budget.max_length, group=f"alpha/{model}")
                 for a in (0.01, 0.02, 0.05, 0.10, 0.15, 0.20, 0.30, 0.50)]
    runs += [Run(f"BH empirical α=0.05 T={t}", {"strategy": "bh", "alpha": 0.05, "temperature": t}, task,
                 budget.n_for(task), max_length=budget.max_length, group="temperature")
             for t in (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)]
    runs += [Run(f"BH empirical α={a} max_k={m}", {"strategy": "bh", "alpha": a, "max_k": m}, task, budget.n_for(task),
                 max_length=budget.max_length, group="alpha x max_k")
             for m in (8, 16, 32, 64) for a in (0.01, 0.05, 0.10)]
    return runs


def matched_compute(budget: Budget, router_logits: Sequence[torch.Tensor], calibration: Calibration,
                    tasks: Sequence[str] = ("wikitext",), targets=(2, 4, 6, 8), per_layer: bool = False) -> list[Run]:
    """Every adaptive strategy at the knob that gives mean k in ``targets`` on calibration text,
    beside top-k at the same k — the fair comparison."""
    adaptive = {"BH empirical": {"strategy": "bh", "pvalues": "empirical", "max_k": 8},
                "BH zscore": {"strategy": "bh", "pvalues": "zscore", "max_k": 8},
                "top-p": {"strategy": "top_p", "max_k": 8}, "threshold": {"strategy": "threshold", "max_k": 8},
                "ratio": {"strategy": "ratio", "max_k": 8}}
    runs = []
    for k in targets:
        configs = [(f"top-{k}", {"strategy": "topk", "k": k})]
        configs += [(f"{name} @k̄={k}", calibrate_to_mean_k(cfg, k, router_logits, calibration, per_layer))
                    for name, cfg in adaptive.items()]
        runs += [Run(label, cfg, task, budget.n_for(task), max_length=budget.max_length, group=f"matched k={k}")
                 for task in tasks for label, cfg in configs]
    return runs


SEED_PROMPT_CONFIGS = {
    "topk_8": {"strategy": "topk", "k": 8},
    "bh_strict": {"strategy": "bh", "alpha": 0.01, "max_k": 8},
    "bh_moderate": {"strategy": "bh", "alpha": 0.05, "max_k": 8},
    "bh_loose": {"strategy": "bh", "alpha": 0.10, "max_k": 8},
    "bh_adaptive": {"strategy": "bh", "alpha": 0.05, "temperature": 2.0, "max_k": 8},
}


def prompt_suite(budget: Budget) -> list[Run]:
    return [Run(name, cfg, "prompts", new_tokens=budget.new_tokens, group="prompt suite")
            for name, cfg in SEED_PROMPT_CONFIGS.items()]


PRESETS = ("full", "deep-dive", "matched", "prompts")


# --------------------------------------------------------------------------- calibration pass


def calibration_windows(tokenizer, window: int = 512, max_tokens: int = 32768) -> list[torch.Tensor]:
    """Token windows [1, S] of the held-out WikiText-2 calibration articles."""
    from .data import load_wikitext_documents
    documents = load_wikitext_documents().records[-CALIBRATION_DOCS:]
    ids = tokenizer("".join(d["page"] for d in documents), verbose=False)["input_ids"][:max_tokens]   # windowed below
    return [torch.tensor(ids[i:i + window])[None] for i in range(0, len(ids), window)]


def calibrate(model, tokenizer, max_tokens: int = 32768, window: int = 512, model_id: str | None = None
              ) -> tuple[Calibration, list[torch.Tensor]]:
    """One teacher-forced pass with the native router → (Calibration, per-layer logits [T, N])."""
    from .patching import collect_router_logits, find_moe_blocks
    device = next(model.parameters()).device
    batches = [w.to(device) for w in calibration_windows(tokenizer, window, max_tokens)]
    with torch.no_grad():
        logits = collect_router_logits(model, batches, max_tokens=max_tokens)
    meta = {"model": model_id or getattr(model.config, "_name_or_path", ""),
            "data": f"wikitext-2-raw-v1 test, last {CALIBRATION_DOCS} articles", "tokens": int(logits[0].shape[0])}
    return Calibration.from_router_logits(logits, top_k=find_moe_blocks(model)[0].top_k, metadata=meta), logits


# --------------------------------------------------------------------------- execution


@dataclass
class SweepContext:
    model: Any
    tokenizer: Any
    model_id: str
    calibration: Calibration | None = None
    extra: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"model_id": self.model_id, "dtype": str(next(self.model.parameters()).dtype),
                "calibration": (self.calibration.metadata if self.calibration else None), **self.extra}


def _patch(context: SweepContext, routing: Mapping):
    from .patching import RoutingPatch
    if "per_layer" in routing:
        layers = {int(layer): cfg for layer, cfg in routing["per_layer"].items()}
        return RoutingPatch(context.model, None, layers=layers, calibration=context.calibration, verbose=False)
    return RoutingPatch(context.model, dict(routing), calibration=context.calibration, verbose=False)


def _floor_ceiling(counts: np.ndarray, patch) -> dict:
    """Share of (token, layer) counts at each layer's min_k (floor) and max_k (ceiling);
    ``counts`` is [tokens, layers] in the order of ``patch.layers``."""
    min_k = np.array([patch.routers[layer].min_k for layer in patch.layers])
    max_k = np.array([patch.routers[layer].max_k for layer in patch.layers])
    return {"floor_rate": float((counts == min_k).mean()), "ceiling_rate": float((counts == max_k).mean())}


def execute_eval(context: SweepContext, run: Run, run_dir: Path) -> dict:
    from .evaluation import evaluate
    docs = None
    if run.task == "wikitext":
        from .data import load_wikitext_documents
        docs = load_wikitext_documents().records[:EVAL_WIKITEXT_DOCS][: run.n]
    with _patch(context, run.routing) as patch:
        result = evaluate(context.model, context.tokenizer, run.task, n=None if docs else run.n, seed=run.seed,
                          docs=docs, max_length=run.max_length, recorder=patch, model_id=context.model_id,
                          routing_config=dict(run.routing))
        limits = _floor_ceiling(result.token_experts, patch)
    bad = {k: v for k, v in result.metrics.items() if isinstance(v, float) and not math.isfinite(v)
           and not k.endswith("_stderr")}
    if bad:
        raise FloatingPointError(f"non-finite metrics {bad}: the routed model produced NaN/inf")
    result.save(run_dir)
    scoring = result.config["scoring"]
    return {"metrics": result.metrics, "experts": result.routing, **limits,
            "tokens_per_s": scoring["input_tokens_per_s"], "n_items": result.config["n_items"],
            "data": result.config["data"], "max_length": result.config["max_length"],
            "stride": result.config["stride"], "versions": result.config["versions"],
            "device": result.config["device"], "dtype": result.config["dtype"]}


def execute_prompts(context: SweepContext, run: Run, run_dir: Path) -> dict:
    """Greedy generation of ``new_tokens`` for the 12 category prompts, all in one batch."""
    from .data import prompt_set
    prompts = prompt_set("categories")
    tokenizer, model = context.tokenizer, context.model
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = tokenizer([p["prompt"] for p in prompts], return_tensors="pt", padding=True).to(model.device)
    finally:
        tokenizer.padding_side = side
    with _patch(context, run.routing) as patch, torch.no_grad():
        started = time.perf_counter()
        output = model.generate(**batch, max_new_tokens=run.new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
        seconds = time.perf_counter() - started
        tokens = patch.recorder.tokens()
        counts = patch.recorder.counts()  # [layers, tokens]
        limits = _floor_ceiling(counts.T, patch)
    per_token = counts.mean(axis=0)
    rows = []
    for b, prompt in enumerate(prompts):
        mine = (tokens["batch"] == b).to_numpy()
        prefill = mine & (tokens["phase"] == "prefill").to_numpy()
        rows.append({"id": prompt["id"], "category": prompt["category"],
                     "mean_experts": float(per_token[mine].mean()),
                     "mean_experts_prompt": float(per_token[prefill].mean()),
                     "mean_experts_generated": float(per_token[mine & ~prefill].mean()) if (mine & ~prefill).any() else None,
                     "text": tokenizer.decode(output[b, batch["input_ids"].shape[1]:], skip_special_tokens=True)})
    write_json(run_dir.with_suffix(".json"), rows)
    new = int((output.shape[1] - batch["input_ids"].shape[1]) * len(prompts))
    return {"prompts": rows, "experts": {"mean_experts": float(per_token.mean()),
                                         "mean_experts_per_layer": counts.mean(axis=1).tolist()},
            **limits, "tokens_per_s": new / seconds, "generated_tokens": new, "seconds_generate": seconds}


def run_sweep(context: SweepContext, runs: Sequence[Run], out: str | Path, retry_failed: bool = False,
              progress: bool = True, name: str = "sweep") -> list[dict]:
    """Run every run not yet recorded in ``out/results.jsonl``; return the latest record of each run."""
    from tqdm.auto import tqdm
    store = ResultStore(out)
    (store.folder / "runs").mkdir(exist_ok=True)
    described = context.describe()
    write_json(store.folder / "sweep.json", {"name": name, "context": described, "n_runs": len(runs),
                                             "runs": [asdict(r) for r in runs]})
    done = store.latest()
    ids = [run.run_id(described) for run in runs]
    todo = [(run, rid) for run, rid in zip(runs, ids)
            if rid not in done or (retry_failed and done[rid]["status"] == "failed")]
    for run, run_id in tqdm(todo, desc=name, disable=not progress, unit="run"):
        started = time.time()
        record = {"run_id": run_id, **asdict(run), "strategy": run.routing.get("strategy"), "context": described}
        try:
            execute = execute_prompts if run.task == "prompts" else execute_eval
            record |= {"status": "ok", **execute(context, run, store.folder / "runs" / run_id)}
        except Exception as error:  # an OOM, NaN or bad config fails this run, not the sweep
            if isinstance(error, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            record |= {"status": "failed", "error": f"{type(error).__name__}: {error}",
                       "traceback": traceback.format_exc(limit=4)}
        record |= {"seconds": round(time.time() - started, 3), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        store.append(record)
    latest = store.latest()
    return [latest[rid] for rid in ids if rid in latest]
