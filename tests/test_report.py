"""The report object on a real (small) sweep of the bundled tiny model: read-only building, findings
gated by the paired tests, chance levels, the model named for what it is, files written on request."""
import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bh_routing import experiments as ex
from bh_routing import findings as fd
from bh_routing.evaluation import TASKS
from bh_routing.models import TINY_MODEL_DIR, describe_model, load_model
from bh_routing.report import build_report

needs_tiny = pytest.mark.skipif(not (TINY_MODEL_DIR / "config.json").is_file(), reason="bundled tiny model absent")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    model, tokenizer = load_model("tiny", device="cpu", dtype="float32", verbose=False)
    configs = [("native top-8", {"strategy": "topk", "k": 8}),
               ("native top-8 again", {"strategy": "topk", "k": 8}),     # identical outputs: a tie
               ("top-1", {"strategy": "topk", "k": 1}),                   # far fewer experts: clearly worse
               ("BH softmax α=0.2", {"strategy": "bh", "pvalues": "softmax", "alpha": 0.2})]
    runs = [ex.Run(label, cfg, "domains", 48, max_length=64) for label, cfg in configs]
    runs += [ex.Run(label, cfg, "hellaswag", 8, max_length=64) for label, cfg in configs[:3]]
    records = ex.run_sweep(ex.SweepContext(model, tokenizer, "tiny"), runs, folder, progress=False)
    assert all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    return folder


def _finding(report, task, candidate):
    return next(f for f in report.findings if f.comparison.task == task and f.comparison.candidate == candidate)


@needs_tiny
def test_report_states_only_supported_findings(sweep):
    before = sorted(p.name for p in sweep.iterdir())
    report = build_report(sweep)
    assert sorted(p.name for p in sweep.iterdir()) == before          # building reads, never writes
    worse = _finding(report, "domains", "top-1")
    assert worse.verdict == "worse" and worse.effect < 0 and worse.ci_high < 0 and worse.n == 48
    tie = _finding(report, "domains", "native top-8 again")
    assert tie.verdict == "no difference detected" and tie.effect == 0 and tie.pvalue == 1.0
    # the paired test is the task's: per-document log-likelihood, paired t, reproduced here
    assert worse.test == "paired t" and TASKS["domains"].outcome.unit == "document"
    # one family: BH-adjusted p-values come from every tested comparison of the report
    tested = [f for f in report.findings if f.family_size]
    adjusted, _ = fd.bh_adjust([f.pvalue for f in tested])
    assert [f.p_adjusted for f in tested] == pytest.approx(list(adjusted))


@needs_tiny
def test_accuracy_at_chance_gives_no_conclusion(sweep):
    report = build_report(sweep)
    check = next(c for c in report.chance if c.task == "hellaswag")
    assert check.chance == 0.25 and check.n == 8 and check.at_chance        # 8 questions cannot leave chance
    assert {f.verdict for f in report.findings if f.comparison.task == "hellaswag"} == {"at chance"}
    assert "at chance on this model: no conclusion" in report.findings_markdown()


@needs_tiny
def test_report_names_the_bundled_model_and_writes_its_files(sweep, tmp_path):
    report = build_report(sweep)
    markdown = report.to_markdown()
    assert describe_model("tiny") in markdown and "2.6 M-parameter pipeline model" in markdown
    assert "descriptive" in markdown.lower() and "Throughput is not shown" in markdown
    assert report._repr_markdown_() == markdown
    assert not any(f.name.startswith("speed") for f in report.figures)
    path = report.write(tmp_path)
    assert path.read_text() == markdown
    for name in ("runs.csv", "comparison.csv", "domains.csv", "analysis_summary.json", "pareto_domains.png",
                 "experts_by_domain.png"):
        assert (tmp_path / name).exists(), name
    summary = json.loads((tmp_path / "analysis_summary.json").read_text())
    assert any("top-1" in line and "worse" in line for line in summary["findings"])


@needs_tiny
def test_domains_table_matches_the_runs(sweep):
    report = build_report(sweep)
    domains = report.domains
    assert set(domains["domain"]) == {"encyclopedia", "biomedical", "math", "code"}
    top8 = domains[domains["label"] == "native top-8"]
    assert np.allclose(top8["mean_experts"], 8.0)                     # fixed by construction
    run = report.runs[(report.runs["label"] == "native top-8") & (report.runs["task"] == "domains")].iloc[0]
    for row in top8.itertuples():
        assert row.token_perplexity == pytest.approx(run[f"token_perplexity_{row.domain}"], rel=1e-9)
    # BH's allocation across domains is tested; top-k's (constant) is not
    assert list(report.domain_allocation["label"]) == ["BH softmax α=0.2"]
