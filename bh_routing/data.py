"""Evaluation data: HF `datasets` when the hub is reachable, bundled copies offline.

Every loader returns a `Dataset(name, records, provenance)`. Records have the same schema and the
same order whichever source was used, so a result computed offline can be compared with one computed
on Colab. Subsetting is explicit: `n` alone takes the first n records; `n` with `seed` takes n records
from a seeded shuffle of the source's full record list. Provenance records what was used.

Bundled copies (`bh_routing/bundled_data/`, see its README.md for sources and licences):
WikiText-2 raw test (whole), LAMBADA OpenAI test (whole), HellaSwag validation (whole).

This module deliberately imports neither torch nor `datasets` at import time (`datasets` is
imported only when the hub is actually used).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from importlib import resources
from typing import Any, Callable, Iterable, Iterator, Mapping

SOURCES = ("auto", "hub", "bundled")


class DataUnavailableError(RuntimeError):
    """The requested data cannot be provided from the requested source (offline, or too few records)."""


# --------------------------------------------------------------------------------------------------
# Records and provenance
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Provenance:
    """Where records came from, so a result can say exactly what it was computed on."""
    dataset: str               # our name: "wikitext", "wikitext_documents", "hellaswag", "lambada"
    source: str                # "hub" or "bundled" (what was used, never "auto")
    location: str              # hub "id/config:split", or the bundled file name
    population: int            # records in the source before subsetting
    n: int | None              # as requested
    seed: int | None           # as requested
    sha256: str | None         # of the bundled file's uncompressed content; None for the hub
    note: str = ""             # e.g. why "auto" fell back to the bundled copy
    part: str | None = None    # WikiText articles: "evaluation", "calibration" or "all" (wikitext_split)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Dataset:
    name: str
    records: list[dict[str, Any]]
    provenance: Provenance

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)

    def __getitem__(self, index):
        return self.records[index]


# --------------------------------------------------------------------------------------------------
# Hub reachability (shared with models.py; no torch here)
# --------------------------------------------------------------------------------------------------

_TRUE_VALUES = {"1", "true", "yes", "on"}
_PROBE_CACHE: dict[str, tuple[float, bool]] = {}
_PROBE_CACHE_SECONDS = 60.0


def hub_offline_by_env() -> bool:
    """True when the user asked for offline mode (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)."""
    return any(os.environ.get(var, "").strip().lower() in _TRUE_VALUES
               for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Can the Hugging Face hub be reached right now? Never blocks longer than `timeout_s`.

    The probe runs in a daemon thread because a socket timeout does not bound DNS resolution,
    which is where firewalled machines tend to hang. Answers are cached for a minute.
    """
    if hub_offline_by_env():
        return False
    endpoint = hub_endpoint()
    cached = _PROBE_CACHE.get(endpoint)
    if cached and time.monotonic() - cached[0] < _PROBE_CACHE_SECONDS:
        return cached[1]

    answer: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout_s)
            answer.append(True)
        except urllib.error.HTTPError:
            answer.append(True)        # the server answered, even if with an error status
        except Exception:
            answer.append(False)

    thread = threading.Thread(target=probe, daemon=True, name="bh_routing-hub-probe")
    thread.start()
    thread.join(timeout_s)
    reachable = bool(answer and answer[0])
    _PROBE_CACHE[endpoint] = (time.monotonic(), reachable)
    return reachable


# --------------------------------------------------------------------------------------------------
# Dataset specifications: hub location, bundled file, row -> record conversion
# --------------------------------------------------------------------------------------------------

BUNDLED_DIR = "bundled_data"
HELLASWAG_BUNDLED_COUNT = 10042

HELLASWAG_KEYS = ("ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings",
                  "source_id", "split", "split_type", "label")


def wikitext_record(row: Mapping[str, Any]) -> dict[str, Any]:
    """HF `wikitext` row -> record: {"text": line}. Lines keep their "\\n"; blank lines are ""."""
    return {"text": row["text"]}


def hellaswag_record(row: Mapping[str, Any]) -> dict[str, Any]:
    """HF `Rowan/hellaswag` row -> record. The hub stores `label` as a string; we use int
    (as lm-eval does), so hub and bundled (int in the original jsonl) records are equal."""
    record = {key: row[key] for key in HELLASWAG_KEYS}
    record["ind"] = int(record["ind"])
    record["label"] = int(record["label"])
    record["endings"] = list(record["endings"])
    return record


def lambada_record(row: Mapping[str, Any]) -> dict[str, Any]:
    """HF `EleutherAI/lambada_openai` row -> record: {"text": passage}; the target is its last word."""
    return {"text": row["text"]}


@dataclass(frozen=True)
class _Spec:
    hub_path: str
    hub_config: str | None
    hub_split: str
    bundled_file: str
    full_size: int                          # records in the complete split
    to_record: Callable[[Mapping[str, Any]], dict[str, Any]]
    read_bundled: Callable[[bytes], list[dict[str, Any]]]

    @property
    def hub_location(self) -> str:
        config = f"/{self.hub_config}" if self.hub_config else ""
        return f"{self.hub_path}{config}:{self.hub_split}"


def _wikitext_rows_from_raw(content: bytes) -> list[dict[str, Any]]:
    # The HF `wikitext` builder yields each line of wiki.test.raw with its "\n", and "" for blank
    # lines (which are " \n" in the file). Reproduce that exactly.
    lines = content.decode("utf-8").splitlines(keepends=True)
    return [{"text": line if line.strip() else ""} for line in lines]


def _jsonl_rows(content: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in content.decode("utf-8").splitlines() if line.strip()]


_SPECS: dict[str, _Spec] = {
    # `wikitext` on the hub now redirects to `Salesforce/wikitext` (parquet); use the canonical id.
    "wikitext": _Spec("Salesforce/wikitext", "wikitext-2-raw-v1", "test",
                      "wikitext-2-raw-v1_test.raw.gz", 4358, wikitext_record, _wikitext_rows_from_raw),
    "hellaswag": _Spec("Rowan/hellaswag", None, "validation",
                       "hellaswag_validation.jsonl.gz", 10042,
                       hellaswag_record, _jsonl_rows),
    "lambada": _Spec("EleutherAI/lambada_openai", "default", "test",
                     "lambada_openai_test.jsonl.gz", 5153, lambada_record, _jsonl_rows),
}


# --------------------------------------------------------------------------------------------------
# Reading the two sources
# --------------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _bundled_content(name: str) -> bytes:
    """The uncompressed bytes of a bundled copy (cached: records are rebuilt per call, so callers
    may mutate them freely)."""
    spec = _SPECS[name]
    path = resources.files("bh_routing").joinpath(BUNDLED_DIR, spec.bundled_file)
    try:
        content = gzip.decompress(path.read_bytes())
    except FileNotFoundError as error:
        raise DataUnavailableError(
            f"The bundled copy {BUNDLED_DIR}/{spec.bundled_file} is missing from this installation "
            f"of bh_routing; reinstall the package (it ships *.gz package data) or use source='hub'."
        ) from error
    return content


def _read_bundled(name: str) -> tuple[list[dict[str, Any]], str]:
    """All records of the bundled copy, and the sha256 of its uncompressed content."""
    spec, content = _SPECS[name], _bundled_content(name)
    return [spec.to_record(row) for row in spec.read_bundled(content)], hashlib.sha256(content).hexdigest()


def _load_hub_rows(spec: _Spec) -> Iterable[Mapping[str, Any]]:
    import datasets  # heavy: imported only when the hub is used

    try:
        return datasets.load_dataset(spec.hub_path, spec.hub_config, split=spec.hub_split)
    except RuntimeError as error:
        # datasets >= 4 refuses repositories that still hold a loading script; the hub keeps an
        # automatic parquet conversion of them on this branch.
        if "script" not in str(error).lower():
            raise
        return datasets.load_dataset(spec.hub_path, spec.hub_config, split=spec.hub_split,
                                     revision="refs/convert/parquet")


def _subset(records: list[dict[str, Any]], n: int | None, seed: int | None) -> list[dict[str, Any]]:
    if seed is not None:
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        records = [records[i] for i in order]
    return records if n is None else records[:n]


def _check_n(name: str, n: int | None, available: int, source: str) -> None:
    if n is None:
        return
    if n < 0:
        raise ValueError(f"n must be >= 0 or None, got {n}")
    if n > available:
        spec = _SPECS[name]
        if source == "bundled" and available < spec.full_size:
            raise DataUnavailableError(
                f"{name}: n={n} exceeds the bundled copy, which holds only the first {available} of "
                f"{spec.full_size} records ({spec.bundled_file}). Use n <= {available}, or "
                f"source='hub' on a machine that can reach the Hugging Face hub.")
        raise DataUnavailableError(f"{name}: n={n} exceeds the {available} records of {source} data.")


def _resolve_source(source: str) -> tuple[str, str]:
    """'auto' -> ('hub' | 'bundled', reason). 'hub' offline fails fast with what to do."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if source == "bundled":
        return "bundled", ""
    if hub_reachable():
        return "hub", ""
    reason = ("offline by environment (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)" if hub_offline_by_env()
              else f"hub unreachable ({hub_endpoint()})")
    if source == "hub":
        raise DataUnavailableError(
            f"source='hub' was requested but the Hugging Face hub cannot be used: {reason}. "
            f"Use source='bundled' (or 'auto') for the copies shipped with bh_routing.")
    return "bundled", reason


def _load(name: str, source: str, n: int | None, seed: int | None) -> Dataset:
    spec = _SPECS[name]
    used, note = _resolve_source(source)
    if used == "hub":
        try:
            records = [spec.to_record(row) for row in _load_hub_rows(spec)]
        except Exception as error:
            if source == "hub":
                raise
            warnings.warn(f"{name}: loading {spec.hub_location} from the hub failed ({error!r}); "
                          f"using the bundled copy.", stacklevel=3)
            used, note = "bundled", f"hub load failed: {type(error).__name__}"
        else:
            _check_n(name, n, len(records), "hub")
            provenance = Provenance(name, "hub", spec.hub_location, len(records), n, seed, None, note)
            return Dataset(name, _subset(records, n, seed), provenance)

    bundled, digest = _read_bundled(name)
    _check_n(name, n, len(bundled), "bundled")
    provenance = Provenance(name, "bundled", spec.bundled_file, len(bundled), n, seed, digest, note)
    return Dataset(name, _subset(bundled, n, seed), provenance)


# --------------------------------------------------------------------------------------------------
# Public loaders
# --------------------------------------------------------------------------------------------------

def load_wikitext(source: str = "auto", n: int | None = None, seed: int | None = None) -> Dataset:
    """WikiText-2 raw, test split, as lines: records {"text": line} (4358; blank lines are "").

    For perplexity, use `load_wikitext_documents` (whole articles, as lm-eval's `wikitext` task)."""
    return _load("wikitext", source, n, seed)


def load_hellaswag(source: str = "auto", n: int | None = None, seed: int | None = None) -> Dataset:
    """HellaSwag validation: records with keys HELLASWAG_KEYS, `label` an int in 0..3.

    10042 items, bundled whole, so `n` and `seed` select the same items from either source."""
    return _load("hellaswag", source, n, seed)


def load_lambada(source: str = "auto", n: int | None = None, seed: int | None = None) -> Dataset:
    """LAMBADA (OpenAI detokenized) test: records {"text": passage} (5153). See `lambada_context_target`."""
    return _load("lambada", source, n, seed)


def load_wikitext_documents(source: str = "auto", n: int | None = None,
                            seed: int | None = None) -> Dataset:
    """WikiText-2 raw test as articles: records {"page": text} (62 documents), formed from the lines
    exactly as `EleutherAI/wikitext_document_level` (used by lm-eval's `wikitext` task) forms them.
    `n`/`seed` select documents."""
    lines = load_wikitext(source)
    records = [{"page": page} for page in wikitext_documents(r["text"] for r in lines.records)]
    _check_n("wikitext", n, len(records), "WikiText document")
    provenance = Provenance(
        "wikitext_documents", lines.provenance.source, lines.provenance.location, len(records),
        n, seed, lines.provenance.sha256,
        "; ".join(filter(None, ["documents formed from lines as EleutherAI/wikitext_document_level",
                                lines.provenance.note])))
    return Dataset("wikitext_documents", _subset(records, n, seed), provenance)


WIKITEXT_CALIBRATION_ARTICLES = 12  # the last articles of WikiText-2 test: BH p-value calibration text
WIKITEXT_PARTS = ("evaluation", "calibration", "all")


def wikitext_split(part: str = "evaluation", source: str = "auto", n: int | None = None,
                   seed: int | None = None) -> Dataset:
    """The one place that splits WikiText-2 test articles between calibration and evaluation.

    ``"calibration"``: the last ``WIKITEXT_CALIBRATION_ARTICLES`` articles (the BH p-value null);
    ``"evaluation"``: all the others, so no evaluated token was seen by calibration; ``"all"``: every
    article (evaluation text then includes calibration text). ``n``/``seed`` select articles within
    the part; the part is recorded in the provenance."""
    if part not in WIKITEXT_PARTS:
        raise ValueError(f"part must be one of {WIKITEXT_PARTS}, got {part!r}")
    articles = load_wikitext_documents(source)
    cut = len(articles.records) - WIKITEXT_CALIBRATION_ARTICLES
    records = {"evaluation": articles.records[:cut], "calibration": articles.records[cut:],
               "all": articles.records}[part]
    _check_n("wikitext", n, len(records), f"WikiText {part} article")
    where = {"evaluation": f"articles 1-{cut}", "calibration": f"articles {cut + 1}-{len(articles.records)}",
             "all": f"all {len(articles.records)} articles, calibration text included"}[part]
    provenance = replace(articles.provenance, n=n, seed=seed, population=len(records), part=part,
                         note="; ".join(filter(None, [where, articles.provenance.note])))
    return Dataset("wikitext_documents", _subset(records, n, seed), provenance)


def data_versions(names: Iterable[str], source: str = "auto") -> dict[str, str]:
    """What ``load(name, source)`` would read, per dataset: "bundled sha256:<digest>" (the bundled
    copy's uncompressed content) or "hub <location>" (unversioned). A sweep folder stores this so
    that results on different data are never mixed."""
    used, _ = _resolve_source(source)

    def version(name: str) -> str:
        if name == "domains":     # bundled only, whatever the source
            return f"bundled sha256:{hashlib.sha256(_domain_sample()).hexdigest()[:16]}"
        if used == "hub":
            return f"hub {_SPECS[name].hub_location}"
        return f"bundled sha256:{hashlib.sha256(_bundled_content(name)).hexdigest()[:16]}"
    return {name: version(name) for name in sorted(set(names))}


DOMAIN_SAMPLE = ("assets", "tiny-olmoe", "validation_sample.jsonl.gz")


@lru_cache(maxsize=None)
def _domain_sample() -> bytes:
    """The uncompressed held-out sample of the tiny model's four training domains."""
    return gzip.decompress(resources.files("bh_routing").joinpath(*DOMAIN_SAMPLE).read_bytes())


def load_domains(source: str = "auto", n: int | None = None, seed: int | None = None) -> Dataset:
    """Held-out documents of the bundled tiny OLMoE's four training domains (encyclopedia,
    biomedical, math, code; 32 each, 16–256 of its tokens): records {"domain", "text"}, the domains
    interleaved so that the first n records cover all four. Held out from the tiny model's training
    (scripts/train_tiny_olmoe.py); for any other model it is simply text from four domains.
    Bundled only (``source`` "auto" or "bundled")."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if source == "hub":
        raise DataUnavailableError("the domains task has no hub copy: use source='bundled' (or 'auto')")
    content = _domain_sample()
    rows = [{"domain": row["domain"], "text": row["text"]} for row in _jsonl_rows(content)]
    by_domain: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_domain.setdefault(row["domain"], []).append(row)
    records = [group[i] for i in range(max(map(len, by_domain.values()))) for group in by_domain.values()
               if i < len(group)]
    if n is not None and not 0 <= n <= len(records):
        raise DataUnavailableError(f"domains: n={n}, but the bundled sample holds {len(records)} documents")
    provenance = Provenance("domains", "bundled", "/".join(DOMAIN_SAMPLE), len(records), n, seed,
                            hashlib.sha256(content).hexdigest(), "held out from the tiny model's training")
    return Dataset("domains", _subset(records, n, seed), provenance)


def load(name: str, source: str = "auto", n: int | None = None, seed: int | None = None) -> Dataset:
    """Load by name: "wikitext", "wikitext_documents", "hellaswag", "lambada" or "domains"."""
    loaders = {"wikitext": load_wikitext, "wikitext_documents": load_wikitext_documents,
               "hellaswag": load_hellaswag, "lambada": load_lambada, "domains": load_domains}
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(loaders)}")
    return loaders[name](source=source, n=n, seed=seed)


def records_from_hub_rows(name: str, rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Convert rows as `datasets.load_dataset` yields them into our records (the hub code path)."""
    return [_SPECS[name].to_record(row) for row in rows]


# --------------------------------------------------------------------------------------------------
# WikiText documents and LAMBADA targets (text processing used by evaluation)
# --------------------------------------------------------------------------------------------------

def _is_article_heading(raw_line: str) -> bool:
    # Top-level headings look like " = Title = "; section headings " = = Section = = " do not
    # match once "= =" is collapsed to "==".
    collapsed = raw_line.replace("= = =", "===").replace("= =", "==").strip()
    return collapsed.startswith("= ") and collapsed.endswith(" =")


def wikitext_documents(lines: Iterable[str]) -> list[str]:
    """Join WikiText line records ({"text"} values, HF form) into articles.

    Reproduces `EleutherAI/wikitext_document_level`: it splits the raw file on "\\n" and starts a new
    page at each top-level heading, so we first restore the raw text (HF turned blank " \\n" lines
    into "")."""
    raw_text = "".join(line if line else " \n" for line in lines)
    pages, current = [], []
    for raw_line in raw_text.split("\n"):
        if _is_article_heading(raw_line):
            page = "\n".join(current)
            if page.strip():
                pages.append(page)
            current = []
        current.append(raw_line)
    pages.append("\n".join(current))
    return pages


# lm-eval's `wikitext_detokenizer` rules (the target text of its `wikitext` task), applied in order:
# plain replacements (str) and regex substitutions (compiled) interleaved exactly as there.
_DETOKENIZE_STEPS: tuple[tuple[Any, str], ...] = (
    ("s '", "s'"),
    (re.compile(r"/' [0-9]/"), r"/'[0-9]/"),
    (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."),
    (" : ", ": "), (" ; ", "; "), (" . ", ". "),
    (" ! ", "! "), (" ? ", "? "), (" , ", ", "),
    (re.compile(r"\(\s*([^\)]*?)\s*\)"), r"(\1)"),
    (re.compile(r"\[\s*([^\]]*?)\s*\]"), r"[\1]"),
    (re.compile(r"{\s*([^}]*?)\s*}"), r"{\1}"),
    (re.compile(r"\"\s*([^\"]*?)\s*\""), r'"\1"'),
    (re.compile(r"'\s*([^']*?)\s*'"), r"'\1'"),
    ("= = = =", "===="), ("= = =", "==="), ("= =", "=="),
    (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
    (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s"),
)


def wikitext_detokenize(page: str) -> str:
    """Undo WikiText's tokenisation artefacts (" @-@ ", " , " ...) as lm-eval's `wikitext` task does.
    lm-eval counts words and bytes on the *original* page for word/byte perplexity."""
    text = page
    for old, new in _DETOKENIZE_STEPS:
        text = old.sub(new, text) if isinstance(old, re.Pattern) else text.replace(old, new)
    return text


def lambada_context_target(record: Mapping[str, Any]) -> tuple[str, str]:
    """Split a LAMBADA passage as lm-eval's `lambada_openai`: context = all but the last
    space-separated word, target = " " + last word."""
    words = record["text"].split(" ")
    return " ".join(words[:-1]), " " + words[-1]
