"""bh_routing.session and notebook_support: parameters resolved, the calibration saved then
reused, Markdown tables, reports, zips."""
from __future__ import annotations

import json
import zipfile

import pandas as pd
import pytest
import torch

from bh_routing import cost
from bh_routing import notebook_support as nbs, session as sessions
from bh_routing.markdown import markdown_table
from conftest import needs_tiny

pytestmark = pytest.mark.usefixtures("offline_hub")



@needs_tiny
def test_load_or_calibrate_saves_then_reuses(tmp_path):
    from bh_routing.models import load_model
    model, tokenizer = load_model("tiny", verbose=False)
    session = sessions.start_session("02", model="tiny", budget="smoke", out=tmp_path, seed=0)
    assert session.folder == tmp_path / "02_bh_deep_dive" / "tiny_smoke" and session.folder.is_dir()
    first, logits, how = sessions.load_or_calibrate(session, model, tokenizer, need_logits=True)
    assert "calibrated now" in how and session.calibration_path.exists()
    second, again, how = sessions.load_or_calibrate(session, model, tokenizer, need_logits=True, progress=False)
    assert how.startswith("loaded from")
    for a, b in zip(logits, again):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(first.empirical, second.empirical)
    summary = sessions.calibration_summary(second)
    assert (summary["smallest_p"] == 1 / (summary["null_min"] + 1)).all()


# --------------------------------------------------------------------------- sessions and results


def test_session_resolution(tmp_path):
    assert sessions.resolve_model("auto", cuda=False) == "tiny"
    assert sessions.resolve_model("auto", cuda=True) == "allenai/OLMoE-1B-7B-0924"
    assert sessions.resolve_budget("auto", cuda=False) == "demo" and sessions.resolve_budget("auto", cuda=True) == "colab"
    with pytest.raises(ValueError):
        sessions.resolve_budget("huge")
    assert sessions.slug("allenai/OLMoE-1B-7B-0924") == "allenai-OLMoE-1B-7B-0924"
    session = sessions.start_session("01", model="allenai/OLMoE-1B-7B-0924", budget="colab", out=tmp_path, seed=3)
    assert session.plan is not None  # the built-in config plans offline
    assert session.folder.name == "allenai-OLMoE-1B-7B-0924_colab"
    assert "Memory plan" in session.markdown() and json.dumps(session.describe(), default=str)
    plan = cost.t4_memory_plan()
    assert plan.fits and 12.5 < plan.weight_bytes / 2**30 < 13.5


def test_markdown_table_zip_and_download(tmp_path):
    frame = pd.DataFrame({"a": [1, 123456], "b": [0.123456, float("nan")], "c": ["x|y", None], "d": [True, False]})
    text = markdown_table(frame, digits=3)
    assert text.splitlines()[0] == "| a | b | c | d |"
    assert "| 1 | 0.123 | x\\|y | yes |" in text and "| 123,456 | – | – | no |" in text
    assert markdown_table(frame.iloc[:0]) == "_(no rows)_\n"
    folder = tmp_path / "results"
    (folder / "runs").mkdir(parents=True)
    (folder / "a.csv").write_text("x\n1\n")
    (folder / "fig.png").write_bytes(b"png")
    (folder / "runs" / "big.npz").write_bytes(b"0" * 100)
    (folder / "runs" / "r.json").write_text("{}")
    archive = nbs.zip_folder(folder)
    with zipfile.ZipFile(archive) as z:
        assert sorted(z.namelist()) == ["results/a.csv", "results/fig.png"]
    assert "not on Colab" in nbs.offer_download(archive)
    report = nbs.write_report(folder / "R.md", "Title", None, ["## A", "text"], [("fig.png", "a figure")])
    assert report.read_text().startswith("# Title") and "![a figure](fig.png)" in report.read_text()
    assert cost.read_csv(folder / "missing.csv").empty and cost.format_duration(4000) == "67 min"




def test_calibration_reading_states_resolution_from_the_null_sizes():
    from types import SimpleNamespace
    counts = torch.tensor([[99, 199], [499, 999]])  # [layers, experts] null sizes
    calibration = SimpleNamespace(empirical_counts=counts, num_experts=2, num_layers=2,
                                  metadata={"tokens": 1234})
    table = sessions.calibration_summary(calibration)
    text = sessions.describe_calibration(calibration, table)
    # smallest p of the worst layer: 1/(99+1) = 0.01 <= α/N for α = 0.05 (0.025) and 0.10, not 0.01
    assert "Calibrated on 1,234 tokens; each expert's null holds 99–999 logits" in text
    assert "1.00e-02 or less" in text and "α ∈ {0.05, 0.1}" in text


def test_say_table_keep_and_finish_write_what_was_shown(tmp_path, capsys):
    session = sessions.start_session("02", model="tiny", budget="smoke", out=tmp_path, seed=0)
    frame = pd.DataFrame({"layer": [0, 1], "value": [0.5, 0.25]})
    assert session.table(frame, "A table", digits=2, csv="values") is frame
    session.say(["first reading", "second reading"])
    session.say("the summary, computed last", "Summary", lead=True)
    session.keep(values=frame, alpha=0.05)
    archive = session.finish("summary.json", "Title", report_name="R.md")
    shown = capsys.readouterr().out
    assert "not on Colab: the results are at" in shown
    report = (session.folder / "R.md").read_text()
    assert "| 0 | 0.5 |" in report and "- second reading" in report
    # the lead block first, then the rest in the order shown
    order = [report.index(text) for text in ("## Summary", "## A table", "| 1 | 0.25 |", "- first reading")]
    assert order == sorted(order)
    summary = json.loads((session.folder / "summary.json").read_text())
    assert summary["values"] == [{"layer": 0, "value": 0.5}, {"layer": 1, "value": 0.25}]
    assert summary["alpha"] == 0.05 and summary["session"]["notebook"] == "02_bh_deep_dive"
    pd.testing.assert_frame_equal(pd.read_csv(session.folder / "values.csv"), frame)
    with zipfile.ZipFile(archive) as z:
        assert {"tiny_smoke/R.md", "tiny_smoke/summary.json", "tiny_smoke/values.csv"} <= set(z.namelist())
