"""Functions referenced by the task YAMLs in this folder (`!function utils.<name>`).

The tasks are lm-evaluation-harness' own `hellaswag`, `lambada_openai` and `wikitext`, with one
change: the documents come from `bh_routing.data` (bundled copies offline, the hub online) instead of
`datasets.load_dataset` on a hub id. Document processing and per-document metrics are lm-eval's own
functions, imported from the installed harness, so this path really is the harness.

Which documents: the TaskManager's metadata keys `bh_n`, `bh_seed`, `bh_source` (as
`bh_routing.data.load`'s n, seed, source) and, for WikiText, `bh_wikitext_part` (as
`bh_routing.data.wikitext_split`'s part; default "evaluation", the articles calibration does not use).
lm-eval passes the merged metadata to `custom_dataset`.
"""
from __future__ import annotations

from typing import Any

import datasets

from bh_routing import data as _data

# lm-eval's own document processing and metrics (the harness being cross-checked).
from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs  # noqa: F401
from lm_eval.tasks.wikitext.preprocess_wikitext import (  # noqa: F401
    process_results as wikitext_process_results,
    wikitext_detokenizer,
)


def _records(name: str, **metadata: Any) -> list[dict[str, Any]]:
    return _data.load(name, source=metadata.get("bh_source", "auto"),
                      n=metadata.get("bh_n"), seed=metadata.get("bh_seed")).records


def hellaswag_dataset(**metadata: Any) -> dict[str, datasets.Dataset]:
    return {"validation": datasets.Dataset.from_list(_records("hellaswag", **metadata))}


def lambada_dataset(**metadata: Any) -> dict[str, datasets.Dataset]:
    return {"test": datasets.Dataset.from_list(_records("lambada", **metadata))}


def wikitext_dataset(**metadata: Any) -> dict[str, datasets.Dataset]:
    articles = _data.wikitext_split(metadata.get("bh_wikitext_part", "evaluation"), source=metadata.get("bh_source", "auto"),
                                    n=metadata.get("bh_n"), seed=metadata.get("bh_seed")).records
    return {"test": datasets.Dataset.from_list(articles)}
