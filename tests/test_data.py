"""bh_routing.data: bundled copies, the hub code path (fed with local rows), subsetting, prompt sets."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bh_routing import data, prompt_sets
from bh_routing.data import DataUnavailableError

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("BH_SHARED_DATA") or REPO.parent / "shared" / "data")


def shared_file(relative: str) -> Path:
    path = shared_data_dir() / relative
    if not path.is_file():
        pytest.skip(f"shared data file {path} is absent (set BH_SHARED_DATA to ../shared/data)")
    return path


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def wikitext_hub_rows(raw_file: Path) -> list[dict]:
    """Rows as HF `wikitext` yields them: each line with its "\\n", blank lines as ""."""
    return [{"text": line if line.strip() else ""}
            for line in raw_file.read_text(encoding="utf-8").splitlines(keepends=True)]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data._PROBE_CACHE.clear()


# --- bundled copies: counts, schema, provenance -----------------------------------------------------

def test_wikitext_lines_and_documents():
    lines = data.load_wikitext()
    assert len(lines) == 4358
    assert set(lines[0]) == {"text"} and lines[0]["text"] == ""
    assert lines[1]["text"] == " = Robert Boulter = \n"
    documents = data.load_wikitext_documents()
    assert len(documents) == 62                       # lm-eval's wikitext-2 test has 62 documents
    assert all(set(d) == {"page"} for d in documents)
    assert documents[0]["page"].startswith(" = Robert Boulter = \n")
    assert sum(d["page"].count(" @-@ ") for d in documents) == sum(l["text"].count(" @-@ ") for l in lines)


def test_hellaswag_schema():
    hellaswag = data.load_hellaswag()
    assert len(hellaswag) == data.HELLASWAG_BUNDLED_COUNT == 10042
    for record in hellaswag:
        assert tuple(record) == data.HELLASWAG_KEYS
        assert isinstance(record["label"], int) and 0 <= record["label"] < 4
        assert isinstance(record["ind"], int) and len(record["endings"]) == 4


def test_lambada_schema_and_target_split():
    lambada = data.load_lambada()
    assert len(lambada) == 5153 and all(set(r) == {"text"} for r in lambada)
    context, target = data.lambada_context_target({"text": "the cat sat on the mat"})
    assert (context, target) == ("the cat sat on the", " mat")


@pytest.mark.parametrize("loader, digest_prefix", [
    (data.load_wikitext, "173c87a5"), (data.load_lambada, "4aa8d02c"),   # = SOURCES.md digests
    (data.load_hellaswag, None),
])
def test_provenance_of_bundled_copies(loader, digest_prefix):
    loaded = loader()
    provenance = loaded.provenance
    assert provenance.source == "bundled" and "offline" in provenance.note
    assert provenance.population == len(loaded) and provenance.n is None and provenance.seed is None
    assert len(provenance.sha256) == 64
    if digest_prefix:
        assert provenance.sha256.startswith(digest_prefix)
    assert provenance.as_dict()["location"].endswith(".gz")


def test_bundled_files_are_small():
    total = sum(p.stat().st_size for p in (REPO / "bh_routing" / "bundled_data").glob("*.gz"))
    assert total <= 8 * 1024 ** 2
    assert (REPO / "bh_routing" / "bundled_data" / "README.md").is_file()


# --- subsetting --------------------------------------------------------------------------------------

def test_n_alone_takes_the_first_n():
    assert data.load_lambada(n=5).records == data.load_lambada().records[:5]


def test_seeded_subsets_are_reproducible_and_recorded():
    a, b = data.load_hellaswag(n=20, seed=1), data.load_hellaswag(n=20, seed=1)
    assert a.records == b.records and len(a) == 20
    assert a.records != data.load_hellaswag(n=20, seed=2).records
    assert a.records != data.load_hellaswag(n=20).records
    assert (a.provenance.n, a.provenance.seed) == (20, 1)
    assert len(data.load_wikitext_documents(n=3, seed=0)) == 3


def test_n_beyond_the_bundled_subset_says_so():
    with pytest.raises(DataUnavailableError, match="exceeds"):
        data.load_lambada(n=6000)


def test_unknown_source_or_dataset():
    with pytest.raises(ValueError):
        data.load_lambada(source="internet")
    with pytest.raises(ValueError):
        data.load("squad")


# --- sources: auto / hub / bundled ----------------------------------------------------------------------

def test_forced_hub_offline_fails_fast_with_what_to_do():
    start = time.monotonic()
    with pytest.raises(DataUnavailableError, match="source='bundled'"):
        data.load_lambada(source="hub")
    assert time.monotonic() - start < 2


def test_hub_probe_is_bounded_when_the_endpoint_is_down(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    assert data.hub_reachable(timeout_s=2.0) is False
    assert data.load_lambada(n=2).provenance.source == "bundled"   # "auto" falls back
    assert time.monotonic() - start < 5


class FakeHub:
    """Stands in for `datasets.load_dataset`, serving rows from the shared files."""

    def __init__(self, rows_by_path, fail_without_parquet=False):
        self.rows_by_path, self.fail_without_parquet, self.calls = rows_by_path, fail_without_parquet, []

    def __call__(self, path, name=None, split=None, revision=None):
        self.calls.append((path, name, split, revision))
        if self.fail_without_parquet and revision is None:
            raise RuntimeError(f"Dataset scripts are no longer supported, but found {path}.py")
        return self.rows_by_path[path]


def use_fake_hub(monkeypatch, fake):
    import datasets

    monkeypatch.setattr(data, "hub_reachable", lambda timeout_s=3.0: True)
    monkeypatch.setattr(datasets, "load_dataset", fake)


def test_hub_path_gives_the_same_records_as_the_bundled_copies(monkeypatch):
    wikitext_rows = wikitext_hub_rows(shared_file("wikitext/wikitext-2-raw/wiki.test.raw"))
    hellaswag_rows = jsonl(shared_file("hellaswag/hellaswag_val.jsonl"))
    for row in hellaswag_rows:
        row["label"] = str(row["label"])          # the hub stores the label as a string
    lambada_rows = jsonl(shared_file("lambada/lambada_test.jsonl"))
    fake = FakeHub({"Salesforce/wikitext": wikitext_rows, "Rowan/hellaswag": hellaswag_rows,
                    "EleutherAI/lambada_openai": lambada_rows})
    bundled = {name: data.load(name, source="bundled") for name in ("wikitext", "hellaswag", "lambada")}
    use_fake_hub(monkeypatch, fake)

    for name in ("wikitext", "lambada"):
        from_hub = data.load(name, source="auto")
        assert from_hub.provenance.source == "hub" and from_hub.provenance.sha256 is None
        assert from_hub.records == bundled[name].records
    hellaswag = data.load_hellaswag(source="hub")
    assert len(hellaswag) == 10042
    assert hellaswag.records == bundled["hellaswag"].records
    assert data.load_hellaswag(source="hub", n=50).records == data.load_hellaswag(source="bundled", n=50).records
    assert data.load_wikitext_documents(source="hub").records == data.load_wikitext_documents(source="bundled").records
    assert ("Salesforce/wikitext", "wikitext-2-raw-v1", "test", None) in fake.calls
    assert ("Rowan/hellaswag", None, "validation", None) in fake.calls
    assert ("EleutherAI/lambada_openai", "default", "test", None) in fake.calls


def test_hub_path_retries_on_the_parquet_branch_for_script_datasets(monkeypatch):
    fake = FakeHub({"EleutherAI/lambada_openai": [{"text": "a b c"}]}, fail_without_parquet=True)
    use_fake_hub(monkeypatch, fake)
    assert data.load_lambada(source="hub").records == [{"text": "a b c"}]
    assert fake.calls[-1][-1] == "refs/convert/parquet"


def test_auto_falls_back_to_bundled_when_the_hub_load_fails(monkeypatch):
    def broken(*args, **kwargs):
        raise ConnectionError("simulated")

    use_fake_hub(monkeypatch, broken)
    with pytest.warns(UserWarning, match="using the bundled copy"):
        loaded = data.load_lambada(n=3)
    assert loaded.provenance.source == "bundled" and "ConnectionError" in loaded.provenance.note
    with pytest.raises(ConnectionError):
        data.load_lambada(source="hub")


# --- bundled copies equal the shared originals -----------------------------------------------------------

def test_bundled_wikitext_equals_shared_file():
    raw = shared_file("wikitext/wikitext-2-raw/wiki.test.raw")
    assert data.load_wikitext(source="bundled").records == wikitext_hub_rows(raw)
    assert data.load_wikitext().provenance.sha256 == hashlib.sha256(raw.read_bytes()).hexdigest()


def test_bundled_hellaswag_equals_the_shared_file():
    rows = jsonl(shared_file("hellaswag/hellaswag_val.jsonl"))
    assert len(rows) == 10042
    expected = [{key: row[key] for key in data.HELLASWAG_KEYS} for row in rows]
    assert data.load_hellaswag(source="bundled").records == expected


def test_bundled_lambada_equals_shared_file():
    rows = jsonl(shared_file("lambada/lambada_test.jsonl"))
    assert data.load_lambada(source="bundled").records == rows


# --- text helpers ----------------------------------------------------------------------------------------

def test_wikitext_documents_split_at_top_level_headings_only():
    lines = [""," = A = \n", "", " x @-@ y . \n", "", " = = Section = = \n", " z \n", " = B = \n", " w \n", ""]
    pages = data.wikitext_documents(lines)
    assert len(pages) == 2
    assert pages[0].startswith(" = A = ") and "Section" in pages[0] and pages[1].startswith(" = B = ")


def test_wikitext_detokenize():
    page = " = = Early life = = \n He was born in 1 @,@ 000 @-@ year old town ( now a city ) , he said . \n"
    expected = " == Early life ==\nHe was born in 1,000-year old town (now a city), he said.\n"
    assert data.wikitext_detokenize(page) == expected


# --- prompt sets ---------------------------------------------------------------------------------------

def test_prompt_sets():
    baseline, categories, comparison = (prompt_sets.prompt_set(n) for n in prompt_sets.PROMPT_SETS)
    assert [p["category"] for p in baseline] == ["simple", "medium", "complex"]
    assert len(categories) == 12
    assert {c: sum(p["category"] == c for p in categories) for c in ("simple", "medium", "complex", "domain")} \
        == {"simple": 3, "medium": 3, "complex": 3, "domain": 3}
    assert len(comparison) == 10
    everything = baseline + categories + comparison
    assert len({p["id"] for p in everything}) == len(everything)
    assert all(p["prompt"].strip() for p in everything)
    assert len({p["prompt"] for p in categories + comparison}) == 22
    assert [p["id"] for p in categories if p["category"] == "domain"] == \
        ["domain-biomedical", "domain-math", "domain-code"]
    with pytest.raises(ValueError):
        prompt_sets.prompt_set("nope")


def test_data_module_imports_neither_torch_nor_datasets():
    # Load data.py on its own (the package __init__ imports torch for other modules).
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('bh_data', {str(REPO / 'bh_routing' / 'data.py')!r})\n"
            "module = sys.modules['bh_data'] = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(module)\n"
            "print('torch' in sys.modules, 'datasets' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_wikitext_split_owns_calibration_and_evaluation_articles():
    articles = data.load_wikitext_documents().records
    evaluation, calibration = data.wikitext_split("evaluation"), data.wikitext_split("calibration")
    assert len(calibration) == data.WIKITEXT_CALIBRATION_ARTICLES
    assert evaluation.records + calibration.records == articles  # a partition, in order
    assert data.wikitext_split("all").records == articles
    shuffled = data.wikitext_split("evaluation", n=len(evaluation), seed=3).records
    assert shuffled != evaluation.records and sorted(map(str, shuffled)) == sorted(map(str, evaluation.records))
    assert evaluation.provenance.part == "evaluation" and "calibration text included" in data.wikitext_split("all").provenance.note
    with pytest.raises(ValueError, match="part must be one of"):
        data.wikitext_split("train")


def test_wikitext_evaluation_never_scores_calibration_text_unless_asked():
    from bh_routing import evaluation as ev
    calibration = data.wikitext_split("calibration").records
    docs, provenance = ev.load_docs("wikitext", n=50, seed=1)  # every evaluation article, shuffled
    assert len(docs) == 50 and not any(d in calibration for d in docs) and provenance["part"] == "evaluation"
    with pytest.raises(data.DataUnavailableError):
        ev.load_docs("wikitext", n=51, seed=1)
    with pytest.warns(UserWarning, match="calibrated on"):
        docs, provenance = ev.load_docs("wikitext", seed=1, wikitext_part="all")
    assert provenance["part"] == "all" and sum(d in calibration for d in docs) == len(calibration)
