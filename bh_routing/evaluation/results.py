"""What an evaluation returns (:class:`EvalResult`), its routing summary and provenance helpers."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

# ==================================================================================================
# Results
# ==================================================================================================

@dataclass
class EvalResult:
    """What one evaluation produced, and everything needed to say how.

    metrics:        {"acc": ..., ...} (lm-eval's names; `*_stderr` as lm-eval's mean_stderr)
    items:          one row per document (per-item log-likelihoods, predictions, token counts)
    requests:       one row per scored sequence: item, choice (ending / window), n_tokens, logprob,
                    greedy, token_start (index of its first token in the token arrays)
    token_logprobs: float32 [n_tokens], every scored token, in request order (per item for
                    WikiText: the article's tokens in order; HellaSwag: the 4 endings in order)
    token_ids, token_greedy, token_request: aligned with token_logprobs
    token_experts:  int16 [n_tokens, n_layers], experts used at the position that predicted the
                    token (None without a recorder)
    routing:        mean experts per token, overall and per layer, over the scored positions and
                    over all non-padding input positions (None without a recorder)
    config:         provenance: model, data, max_length, stride, batching, timings, versions
    """
    task: str
    metrics: dict[str, float]
    items: pd.DataFrame
    requests: pd.DataFrame
    token_logprobs: np.ndarray
    token_ids: np.ndarray
    token_greedy: np.ndarray
    token_request: np.ndarray
    token_experts: np.ndarray | None
    routing: dict[str, Any] | None
    config: dict[str, Any]

    @property
    def token_item(self) -> np.ndarray:
        """int [n_tokens]: the item each scored token belongs to."""
        return self.requests["item"].to_numpy()[self.token_request]

    def item_token_logprobs(self, item: int) -> np.ndarray:
        return self.token_logprobs[self.token_item == item]

    def paired(self, other: "EvalResult") -> pd.DataFrame:
        """Token-by-token comparison with another result on the same tokens: one row per scored
        token with item, request, token id, both log-probabilities and their difference (other - self)."""
        if self.task != other.task or not np.array_equal(self.token_ids, other.token_ids):
            raise ValueError("results are not on the same tokens (task, data, tokenizer and max_length/stride "
                             "must be the same)")
        return pd.DataFrame({"item": self.token_item, "request": self.token_request, "token_id": self.token_ids,
                             "logprob_a": self.token_logprobs, "logprob_b": other.token_logprobs,
                             "delta": other.token_logprobs.astype(np.float64) - self.token_logprobs})

    def summary(self) -> str:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in self.metrics.items() if not k.endswith("_stderr"))
        routing = f"; experts/token {self.routing['mean_experts']:.2f}" if self.routing else ""
        return (f"{self.task} [{self.config.get('model_id')}, n={self.config.get('n_items')}, "
                f"max_length={self.config.get('max_length')}]: {shown}{routing}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: metrics, routing, config (not the per-token arrays; see `save`)."""
        return {"task": self.task, "metrics": self.metrics, "routing": self.routing, "config": self.config}

    def save(self, path: str | Path) -> None:
        """`path`.json (metrics, routing, config, items, requests) and `path`.npz (token arrays)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = self.to_dict() | {"items": self.items.to_dict(orient="list"),
                                    "requests": self.requests.to_dict(orient="list")}
        path.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=_json_default))
        arrays = {"token_logprobs": self.token_logprobs, "token_ids": self.token_ids,
                  "token_greedy": self.token_greedy, "token_request": self.token_request}
        if self.token_experts is not None:
            arrays["token_experts"] = self.token_experts
        np.savez_compressed(path.with_suffix(".npz"), **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "EvalResult":
        path = Path(path)
        payload = json.loads(path.with_suffix(".json").read_text())
        arrays = np.load(path.with_suffix(".npz"))
        return cls(payload["task"], payload["metrics"], pd.DataFrame(payload["items"]),
                   pd.DataFrame(payload["requests"]), arrays["token_logprobs"], arrays["token_ids"],
                   arrays["token_greedy"], arrays["token_request"],
                   arrays["token_experts"] if "token_experts" in arrays else None,
                   payload["routing"], payload["config"])


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _routing_summary(experts: np.ndarray, experts_all: np.ndarray, n_all_positions: int) -> dict[str, Any]:
    per_layer = experts.mean(axis=0, dtype=np.float64)                                      # [L]
    per_layer_all = experts_all / max(n_all_positions, 1)                                   # [L]
    return {"mean_experts": float(per_layer.mean()), "mean_experts_per_layer": per_layer.tolist(),
            "tokens": int(experts.shape[0]),
            # every non-padding position the model computed (a prefix shared by several requests once)
            "all_positions": {"mean_experts": float(per_layer_all.mean()),
                              "mean_experts_per_layer": per_layer_all.tolist(), "tokens": int(n_all_positions)},
            "aligned_at": "the input position whose logits score the token (padding excluded)"}


def _jsonable(value):
    return None if value is None else json.loads(json.dumps(value, default=_json_default))


def _model_id(model) -> str:
    return str(getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "") or type(model).__name__)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return None


