"""The tasks: documents -> requests, per-request log-likelihoods -> per-item results and metrics;
each task's metrics (name, direction, chance level) and paired unit defined once in :data:`TASKS`."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd

from .. import data as data_module
from ..findings import Outcome
from .metrics import bits_per_byte, mean, mean_stderr, perplexity, weighted_perplexity
from .tokenize import Request, encode, encode_pairs, make_request, prefix_token_id, rolling_windows

LM_EVAL_SEMANTICS = "0.4.13"   # the lm-evaluation-harness version whose definitions are mirrored here
TASK_NAMES = ("wikitext", "hellaswag", "lambada", "domains")
LM_EVAL_TASK_NAMES = ("wikitext", "hellaswag", "lambada")   # the tasks lm-eval defines
# ==================================================================================================
# Tasks: documents -> requests, per-request log-likelihoods -> per-item results and metrics
# ==================================================================================================

def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess`: strip WikiHow's bracket artefacts."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_query_choices(doc: Mapping[str, Any]) -> tuple[str, list[str], int]:
    """lm-eval's hellaswag `process_docs`: (query, choices, gold). Continuations are " " + choice
    (lm-eval's default `target_delimiter`); acc_norm divides by len(choice) without that space."""
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = hellaswag_preprocess(doc["activity_label"] + ": " + ctx)
    return query, [hellaswag_preprocess(ending) for ending in doc["endings"]], int(doc["label"])


def _hellaswag_requests(docs, tokenizer, max_length, stride):
    pairs, keys = [], []
    for item, doc in enumerate(docs):
        query, choices, _ = hellaswag_query_choices(doc)
        for choice, text in enumerate(choices):
            pairs.append((query, " " + text))
            keys.append((item, choice))
    return [make_request(item, choice, ctx, cont, max_length)
            for (item, choice), (ctx, cont) in zip(keys, encode_pairs(tokenizer, pairs))]


def _hellaswag_results(docs, requests: pd.DataFrame):
    rows = []
    for item, group in requests.groupby("item", sort=True):
        doc = docs[item]
        _, choices, gold = hellaswag_query_choices(doc)
        lls = group.sort_values("choice")["logprob"].to_numpy(np.float64)
        chars = np.array([len(c) for c in choices], dtype=np.float64)
        pred, pred_norm = int(np.argmax(lls)), int(np.argmax(lls / chars))
        rows.append({"item": item, "ind": doc.get("ind"), "label": gold, "pred": pred, "pred_norm": pred_norm,
                     "acc": float(pred == gold), "acc_norm": float(pred_norm == gold),
                     "logprobs": lls.tolist(), "choice_chars": chars.astype(int).tolist(),
                     "n_tokens": int(group["n_tokens"].sum())})
    items = pd.DataFrame(rows)
    metrics = {"acc": mean(items["acc"]), "acc_stderr": mean_stderr(items["acc"]),
               "acc_norm": mean(items["acc_norm"]), "acc_norm_stderr": mean_stderr(items["acc_norm"])}
    return items, metrics


def _lambada_requests(docs, tokenizer, max_length, stride):
    pairs = [data_module.lambada_context_target(doc) for doc in docs]
    return [make_request(item, 0, ctx, cont, max_length)
            for item, (ctx, cont) in enumerate(encode_pairs(tokenizer, pairs))]


def _lambada_results(docs, requests: pd.DataFrame):
    items = requests[["item", "logprob", "greedy", "n_tokens"]].copy()
    items["target"] = [data_module.lambada_context_target(docs[i])[1] for i in items["item"]]
    items["acc"] = items.pop("greedy").astype(float)    # every target token is the argmax
    metrics = {"acc": mean(items["acc"]), "acc_stderr": mean_stderr(items["acc"]),
               "perplexity": perplexity(items["logprob"])}
    return items.reset_index(drop=True), metrics


def _wikitext_requests(docs, tokenizer, max_length, stride):
    prefix = prefix_token_id(tokenizer)
    targets = encode(tokenizer, [data_module.wikitext_detokenize(doc["page"]) for doc in docs])
    return [make_request(item, window, ctx, cont, max_length)
            for item, tokens in enumerate(targets)
            for window, (ctx, cont) in enumerate(rolling_windows(tokens, prefix, max_length, stride))]


def _wikitext_results(docs, requests: pd.DataFrame):
    grouped = requests.groupby("item", sort=True)
    items = pd.DataFrame({"logprob": grouped["logprob"].sum(), "n_tokens": grouped["n_tokens"].sum(),
                          "n_windows": grouped.size()}).reset_index()
    # lm-eval counts words and bytes on the original page, not on the detokenized text it scores
    items["n_words"] = [len(re.split(r"\s+", docs[i]["page"])) for i in items["item"]]
    items["n_bytes"] = [len(docs[i]["page"].encode("utf-8")) for i in items["item"]]
    lls = items["logprob"]
    metrics = {"word_perplexity": weighted_perplexity(lls, items["n_words"]),
               "byte_perplexity": weighted_perplexity(lls, items["n_bytes"]),
               "bits_per_byte": bits_per_byte(lls, items["n_bytes"]),
               "token_perplexity": weighted_perplexity(lls, items["n_tokens"])}
    return items, metrics


def _domains_requests(docs, tokenizer, max_length, stride):
    prefix = prefix_token_id(tokenizer)
    targets = encode(tokenizer, [doc["text"] for doc in docs])
    return [make_request(item, window, ctx, cont, max_length)
            for item, tokens in enumerate(targets)
            for window, (ctx, cont) in enumerate(rolling_windows(tokens, prefix, max_length, stride))]


def _domains_results(docs, requests: pd.DataFrame):
    grouped = requests.groupby("item", sort=True)
    items = pd.DataFrame({"logprob": grouped["logprob"].sum(), "n_tokens": grouped["n_tokens"].sum()}).reset_index()
    items["domain"] = [docs[i]["domain"] for i in items["item"]]
    metrics = {"token_perplexity": weighted_perplexity(items["logprob"], items["n_tokens"])}
    for domain, frame in items.groupby("domain", sort=False):
        metrics[f"token_perplexity_{domain}"] = weighted_perplexity(frame["logprob"], frame["n_tokens"])
    return items, metrics


@dataclass(frozen=True)
class Metric:
    """One metric of a task: its name in `EvalResult.metrics`, its direction, and the accuracy a
    guesser gets (`chance`; None when the metric is not an accuracy)."""
    name: str
    higher_is_better: bool
    chance: float | None = None
    description: str = ""


@dataclass(frozen=True)
class Task:
    """A task as data: where its documents come from, how they become requests, how per-request
    log-likelihoods become per-item results and metrics, its lm-eval equivalent, its metrics (the
    first is the headline) and the per-item value paired comparisons test (`outcome`)."""
    name: str
    dataset: str                 # bh_routing.data.load name
    lm_eval_task: str | None     # the task in bh_routing/lm_eval_tasks (None: no lm-eval equivalent)
    lm_eval_source: str | None   # lm-eval's own task of the same name
    output_type: str             # lm-eval's output_type
    build_requests: Callable[..., list[Request]]
    process_results: Callable[..., tuple[pd.DataFrame, dict[str, float]]]
    metrics: tuple[Metric, ...]
    outcome: Outcome
    uses_stride: bool = False

    @property
    def headline(self) -> Metric:
        return self.metrics[0]

    def metric(self, name: str) -> Metric:
        return next(m for m in self.metrics if m.name == name)


_LOGLIKELIHOOD = "log-likelihood"
TASKS: dict[str, Task] = {
    "wikitext": Task("wikitext", "wikitext_documents", "bh_wikitext", "wikitext", "loglikelihood_rolling",
                     _wikitext_requests, _wikitext_results,
                     (Metric("word_perplexity", False, description="WikiText-2 word perplexity"),
                      Metric("byte_perplexity", False), Metric("bits_per_byte", False),
                      Metric("token_perplexity", False)),
                     Outcome("logprob", "continuous", True, "article", _LOGLIKELIHOOD), uses_stride=True),
    "hellaswag": Task("hellaswag", "hellaswag", "bh_hellaswag", "hellaswag", "multiple_choice",
                      _hellaswag_requests, _hellaswag_results,
                      (Metric("acc_norm", True, 0.25, "HellaSwag length-normalised accuracy (4 endings)"),
                       Metric("acc", True, 0.25, "HellaSwag accuracy (4 endings)")),
                      Outcome("acc_norm", "binary", True, "question", "acc_norm")),
    "lambada": Task("lambada", "lambada", "bh_lambada_openai", "lambada_openai", "loglikelihood",
                    _lambada_requests, _lambada_results,
                    # chance: guessing a whole word from an open vocabulary is ≈ 0
                    (Metric("acc", True, 0.0, "LAMBADA last-word accuracy (open vocabulary)"),
                     Metric("perplexity", False)),
                    Outcome("acc", "binary", True, "passage", "accuracy")),
    "domains": Task("domains", "domains", None, None, "loglikelihood_rolling",
                    _domains_requests, _domains_results,
                    (Metric("token_perplexity", False, description="token perplexity on held-out domain text"),),
                    Outcome("logprob", "continuous", True, "document", _LOGLIKELIHOOD), uses_stride=True),
}


