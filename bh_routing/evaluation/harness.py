"""The lm-evaluation-harness backend (optional dependency): the same documents through
``lm_eval.simple_evaluate`` on this package's task YAMLs."""
from __future__ import annotations

import time

import numpy as np
import pandas as pd

from .results import EvalResult, _version
from .tasks import Task

# ==================================================================================================
# The harness itself (optional dependency)
# ==================================================================================================

def _evaluate_lm_eval(model, tokenizer, spec: Task, docs, config, *, n, seed, source, batch_size,
                      wikitext_part, softmax_dtype) -> EvalResult:
    """Run lm_eval.simple_evaluate on this task's YAML (bh_routing/lm_eval_tasks), same documents."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError("backend='lm-eval' needs lm-evaluation-harness: pip install lm-eval") from error
    from ..lm_eval_tasks import TASK_DIR

    started = time.perf_counter()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=config["max_length"],
              batch_size=batch_size if batch_size != "auto" else 1, device=config["device"],
              softmax_dtype=softmax_dtype)
    manager = TaskManager(include_path=TASK_DIR, include_defaults=False,
                          metadata={"bh_n": n, "bh_seed": seed, "bh_source": source,
                                    "bh_wikitext_part": wikitext_part})
    output = lm_eval.simple_evaluate(model=lm, tasks=[spec.lm_eval_task], task_manager=manager,
                                     num_fewshot=0, log_samples=True)
    raw = output["results"][spec.lm_eval_task]
    metrics = {key.split(",")[0]: float(value) for key, value in raw.items()
               if "," in key and isinstance(value, (int, float))}
    samples = sorted(output["samples"][spec.lm_eval_task], key=lambda s: s["doc_id"])
    rows = []
    for sample in samples:
        for choice, response in enumerate(sample["resps"]):
            value = response[0]
            ll, greedy = (value if isinstance(value, (list, tuple)) else (value, None))
            rows.append({"item": sample["doc_id"], "choice": choice, "logprob": float(ll), "greedy": greedy})
    table = pd.DataFrame(rows)
    # the harness does not report token counts: they are ours (the same tokenisation, tested)
    counts = pd.DataFrame([(r.item, r.choice, r.n_scored) for r in
                           spec.build_requests(docs, tokenizer, config["max_length"], None)],
                          columns=["item", "choice", "n_tokens"])
    windows = counts.groupby("item")["choice"].size()
    if spec.output_type == "loglikelihood_rolling":      # one harness row per document, ours per window
        counts = counts.groupby("item", as_index=False)["n_tokens"].sum().assign(choice=0)
    table = table.merge(counts, on=["item", "choice"], how="left", validate="one_to_one")
    items, _ = spec.process_results(docs, table)      # per-item view; the metrics are the harness's
    if "n_windows" in items:
        items["n_windows"] = items["item"].map(windows)
    config |= {"lm_eval_version": _version("lm_eval"), "seconds": time.perf_counter() - started,
               "scoring": {"batch_size": lm.batch_size}}
    empty = np.zeros(0)
    return EvalResult(spec.name, metrics, items, table, empty.astype(np.float32), empty.astype(np.int32),
                      empty.astype(bool), empty.astype(np.int64), None, None, config)
