"""A sweep folder you can trust: one context, damaged files, missing artifacts, transient failures,
and the real faults — a writer SIGKILLed at write/fsync/rename, a full disk, two writers at once."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bh_routing import experiments as ex
from bh_routing.folder import ContextMismatchError, FolderBusyError, folder_lock, move_aside
from bh_routing.models import TINY_MODEL_DIR
from bh_routing.report import build_report
from bh_routing.store import DamagedResultsWarning, read_results

REPO = Path(__file__).resolve().parents[1]
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.skipif(not (Path(TINY_MODEL_DIR) / "model.safetensors").exists(),
                                reason="the bundled tiny OLMoE is not in this checkout")

# Three WikiText runs (saved .npz artifacts, paired tests) and three prompt runs; no calibration needed.
RUNS_SOURCE = """
from bh_routing.experiments import Run
CONFIGS = [("native top-8", {"strategy": "topk", "k": 8}), ("top-2", {"strategy": "topk", "k": 2}),
           ("BH zscore", {"strategy": "bh", "pvalues": "zscore", "alpha": 0.05})]
RUNS = ([Run(label, config, "wikitext", 1, max_length=64) for label, config in CONFIGS]
        + [Run(label, config, "prompts", new_tokens=2) for label, config in CONFIGS])
"""
namespace: dict = {}
exec(RUNS_SOURCE, namespace)
RUNS = namespace["RUNS"]


@pytest.fixture(scope="module")
def tiny():
    from bh_routing.models import load_model
    return load_model("tiny", verbose=False)


def sweep(tiny, out, runs=RUNS, **kwargs):
    model, tokenizer = tiny
    return ex.run_sweep(ex.SweepContext(model, tokenizer, "tiny"), runs, out, progress=False, **kwargs)


def outcome(folder) -> dict:
    """What a report is computed from: per (label, task) the mean experts and quality metrics."""
    records, damaged = read_results(folder)
    assert not damaged
    latest = {r["run_id"]: r for r in records}
    return {(r["label"], r["task"]): (r["status"], r["experts"]["mean_experts"],
                                      {k: v for k, v in (r.get("metrics") or {}).items()})
            for r in latest.values()}


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    sweep(tiny, folder)
    return outcome(folder)


def assert_same_outcome(folder, reference):
    """The same runs and statuses as the uninterrupted sweep exactly; its numbers to 1e-7 (a child
    process computes with one thread and this one may use more: a float reduction's order depends on
    the thread count, ~1e-9 relative)."""
    got = outcome(folder)
    assert {key: status for key, (status, _, _) in got.items()} == {key: s for key, (s, _, _) in reference.items()}
    for key, (_, experts, metrics) in reference.items():
        assert got[key][1] == pytest.approx(experts, rel=1e-7), key
        assert got[key][2] == pytest.approx(metrics, rel=1e-7), key


def assert_complete(folder, reference):
    records, damaged = read_results(folder)
    assert not damaged
    ids = {r["run_id"] for r in records}
    assert len(ids) == len(RUNS)
    assert_same_outcome(folder, reference)
    assert all(status == "ok" for status, _, _ in reference.values())


# --------------------------------------------------------------------------- damaged files


def test_damaged_lines_are_named_set_aside_and_their_runs_redone(tiny, reference, tmp_path):
    sweep(tiny, tmp_path)
    lines = (tmp_path / "results.jsonl").read_bytes().splitlines(keepends=True)
    good = json.loads(lines[0])
    damaged_file = b"".join([lines[0], b"garbage\n", lines[2][: len(lines[2]) // 2] + b"\n", b"\xff\xfe{}\n", b"[]\n",
                             json.dumps({k: v for k, v in good.items() if k != "run_id"}).encode() + b"\n",
                             json.dumps({**good, "run_id": "../../x"}).encode() + b"\n"] + lines[3:])
    # lines 2..7 damaged: runs of lines[1] and lines[2] are gone, the others are intact
    (tmp_path / "results.jsonl").write_bytes(damaged_file)
    before = (tmp_path / "results.jsonl").stat()

    built = build_report(tmp_path)  # reads only: names the damage, writes no checkpoint
    built.write(tmp_path)           # writing the report's own files does not touch the checkpoint either
    assert (tmp_path / "results.jsonl").read_bytes() == damaged_file
    assert (tmp_path / "results.jsonl").stat().st_mtime_ns == before.st_mtime_ns
    report = (tmp_path / "REPORT.md").read_text()
    assert "6 damaged line(s)" in report and "results.jsonl:2: not JSON" in report

    with pytest.warns(DamagedResultsWarning) as warned:
        sweep(tiny, tmp_path)
    message = str(warned[0].message)
    for number, reason in [(2, "not JSON"), (3, "not JSON"), (4, "not UTF-8"), (5, "a JSON list"),
                           (6, "run_id must be"), (7, "run_id must be")]:
        assert f"results.jsonl:{number}: {reason}" in message, (number, message)
    assert "got '../../x'" in message
    assert (tmp_path / "results.jsonl.bad").read_bytes() == damaged_file  # the kept copy, byte for byte
    assert_complete(tmp_path, reference)
    assert len(read_results(tmp_path)[0]) == len(RUNS)  # only the two lost runs were redone


def test_a_finished_run_whose_saved_results_are_gone_is_recomputed(tiny, reference, tmp_path):
    sweep(tiny, tmp_path)
    native = next(r for r in read_results(tmp_path)[0] if r["label"] == "native top-8" and r["task"] == "wikitext")
    assert "saved results missing" not in build_report(tmp_path).to_markdown()  # prompt runs save no EvalResult
    (tmp_path / "runs" / f"{native['run_id']}.npz").unlink()
    # does not crash: names exactly the run whose results are gone
    assert f"saved results missing for 1 run(s), so they are not in the paired tests (a resumed sweep " \
           f"recomputes them): {native['run_id']} (FileNotFoundError)" in build_report(tmp_path).to_markdown()
    with pytest.warns(UserWarning, match="lost their saved results"):
        sweep(tiny, tmp_path)
    assert (tmp_path / "runs" / f"{native['run_id']}.npz").exists()
    assert outcome(tmp_path) == reference


def test_transient_failures_run_again_permanent_ones_only_when_asked(tiny, tmp_path):
    sweep(tiny, tmp_path)
    records = read_results(tmp_path)[0]
    records[0] |= {"status": "failed", "transient": True, "error": "OSError: [Errno 28] No space left on device"}
    records[1] |= {"status": "failed", "transient": False, "error": "FloatingPointError: non-finite metrics"}
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    sweep(tiny, tmp_path)
    latest = {r["run_id"]: r for r in read_results(tmp_path)[0]}
    assert latest[records[0]["run_id"]]["status"] == "ok"  # retried on a plain resume
    assert latest[records[1]["run_id"]]["status"] == "failed"  # kept
    sweep(tiny, tmp_path, retry_failed=True)
    assert {r["status"] for r in read_results(tmp_path)[0][-1:]} == {"ok"}
    assert all(r["status"] == "ok" for r in {r["run_id"]: r for r in read_results(tmp_path)[0]}.values())


@pytest.mark.parametrize("error, transient", [
    (OSError(errno.ENOSPC, "No space left on device"), True), (MemoryError(), True),
    (torch.cuda.OutOfMemoryError("CUDA out of memory"), True), (RuntimeError("CUDA error: out of memory"), True),
    (ValueError("max_k"), False), (FloatingPointError("NaN"), False), (KeyError("acc"), False)])
def test_failures_are_classified(error, transient):
    assert ex.is_transient(error) is transient


# --------------------------------------------------------------------------- one context per folder


def test_a_folder_refuses_another_budget_weights_or_calibration(tiny, tmp_path):
    model, tokenizer = tiny
    sweep(tiny, tmp_path, runs=RUNS[:1])
    results = (tmp_path / "results.jsonl").read_bytes()
    with pytest.raises(ContextMismatchError, match=r"budget of wikitext: folder .*\"n\": 1.*now .*\"n\": 2"):
        sweep(tiny, tmp_path, runs=[ex.Run("native top-8", {"strategy": "topk", "k": 8}, "wikitext", 2, max_length=64)])
    calibration, _ = ex.calibrate(model, tokenizer, max_tokens=512)
    with pytest.raises(ContextMismatchError, match="calibration: folder null"):
        ex.run_sweep(ex.SweepContext(model, tokenizer, "tiny", calibration), RUNS[:1], tmp_path, progress=False)
    parameter = next(model.parameters())
    saved = parameter.detach().clone()
    try:
        with torch.no_grad():
            parameter.view(-1)[0] += 1.0  # the same model id, one changed weight
        with pytest.raises(ContextMismatchError, match="weights_fingerprint") as info:
            sweep(tiny, tmp_path, runs=RUNS[:1])
        assert "--out" in str(info.value) and "--restart" in str(info.value)
    finally:
        with torch.no_grad():
            parameter.copy_(saved)
    assert (tmp_path / "results.jsonl").read_bytes() == results  # nothing was added
    sweep(tiny, tmp_path, runs=RUNS[3:4])  # another task with the same context joins the folder
    assert set(json.loads((tmp_path / "context.json").read_text())["budget"]) == {"wikitext", "prompts"}


def test_restart_moves_the_folder_aside_and_deletes_nothing(tiny, tmp_path):
    folder = tmp_path / "sweep"
    sweep(tiny, folder, runs=RUNS[:1])
    kept = (folder / "results.jsonl").read_bytes()
    moved = move_aside(folder)
    assert not folder.exists() and (moved / "results.jsonl").read_bytes() == kept
    assert moved.name.startswith("sweep.old-")


def test_report_leaves_out_records_of_another_context_in_an_old_folder(tiny, tmp_path):
    sweep(tiny, tmp_path, runs=RUNS[:2])
    records = read_results(tmp_path)[0]
    (tmp_path / "context.json").unlink()  # a folder from before contexts were stored
    stranger = {**records[0], "run_id": "0123456789abcdef", "label": "from another model",
                "context": {**records[0]["context"], "model_id": "other"}}
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps(stranger) + "\n" + results.read_text())  # older than the folder's newest run
    report = build_report(tmp_path).to_markdown()
    assert "1 run(s) of another model, calibration or budget left out: from another model" in report
    assert "| from another model |" not in report


def test_report_escapes_labels(tiny, tmp_path):
    sweep(tiny, tmp_path, runs=[ex.Run("a|b <script>x</script>", {"strategy": "topk", "k": 8}, "wikitext", 1,
                                       max_length=64)])
    report = build_report(tmp_path).to_markdown()
    assert "a\\|b &lt;script&gt;x&lt;/script&gt;" in report and "<script>" not in report


# --------------------------------------------------------------------------- real faults

CHILD = RUNS_SOURCE + """
import json, os, signal, sys
from bh_routing import experiments as ex, store
from bh_routing.models import load_model
out, kill = sys.argv[1], sys.argv[2]
point, _, nth = kill.partition(":")
calls = [0]

def now():  # the nth call at the injected point
    calls[0] += 1
    return calls[0] == int(nth)

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if point == "write":  # half a line reaches the disk, then SIGKILL
    append = store.ResultStore.append
    def torn_append(self, record):
        if now():
            line = (json.dumps(record) + "\\n").encode()
            with open(self.path, "ab") as f:
                f.write(line[: len(line) // 2]); f.flush(); os.fsync(f.fileno())
            die()
        append(self, record)
    store.ResultStore.append = torn_append
elif point == "fsync":  # the whole line written, killed inside its fsync
    fsync = os.fsync
    def dying_fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("results.jsonl") and now():
            die()
        fsync(fd)
    os.fsync = dying_fsync
elif point == "rename":  # killed just before an atomic replace (context.json, sweep.json)
    replace = os.replace
    def dying_replace(src, dst):
        if now():
            die()
        replace(src, dst)
    os.replace = dying_replace
model, tokenizer = load_model("tiny", verbose=False)
ex.run_sweep(ex.SweepContext(model, tokenizer, "tiny"), RUNS, out, progress=False)
"""


def child(tmp_path, out, kill="none", preexec_fn=None):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return subprocess.run([sys.executable, str(script), str(out), kill], env=OFFLINE, capture_output=True, text=True,
                          timeout=300, preexec_fn=preexec_fn)


@pytest.mark.parametrize("kill", ["write:2", pytest.param("fsync:4", marks=pytest.mark.slow), pytest.param("rename:1", marks=pytest.mark.slow),
                                  pytest.param("rename:2", marks=pytest.mark.slow)])
def test_a_writer_killed_at_write_fsync_or_rename_loses_nothing(kill, reference, tmp_path):
    out = tmp_path / "sweep"
    killed = child(tmp_path, out, kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = child(tmp_path, out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_complete(out, reference)


def _fill(folder: Path, leave_bytes: int) -> Path:
    """Take all but ``leave_bytes`` of the file system's free space with one ballast file."""
    ballast = folder / "ballast"
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(ballast, "wb") as f:
        f.write(b"\0" * max(free - leave_bytes, 0))
    return ballast


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); the RLIMIT_FSIZE test covers a full disk")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_fails_runs_transiently_and_a_resume_completes_them(tiny, reference, small_tmpfs):
    out = small_tmpfs / "sweep"
    out.mkdir()
    ballast = _fill(small_tmpfs, leave_bytes=24 * 1024)  # room for a few runs, not all
    try:
        sweep(tiny, out)
        stopped = None
    except OSError as error:  # the disk filled while recording a run
        stopped = error
        assert "rerun the same sweep to resume" in str(error)
    records = {r["run_id"]: r for r in read_results(out)[0]}
    assert len([r for r in records.values() if r["status"] == "ok"]) < len(RUNS)  # the disk did fill up
    assert all(r.get("transient") for r in records.values() if r["status"] == "failed"), stopped
    ballast.unlink()
    sweep(tiny, out)  # a plain resume, no retry_failed
    assert_complete(out, reference)


def _file_size_limit(limit: int):
    def apply():
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_file_size_limit_mid_sweep_then_resume(reference, tmp_path):
    out = tmp_path / "sweep"
    limited = child(tmp_path, out, preexec_fn=_file_size_limit(7000))  # results.jsonl outgrows 7 kB
    assert limited.returncode != 0 and "rerun the same sweep to resume" in limited.stderr, limited.stderr[-2000:]
    finished = len(read_results(out)[0])
    assert 0 < finished < len(RUNS)
    resumed = child(tmp_path, out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_outcome(out, reference)


def test_two_writers_one_is_refused_with_the_other_named(tmp_path):
    command = [sys.executable, "-m", "bh_routing", "sweep", "--preset", "prompts", "--budget", "smoke",
               "--calibration-tokens", "1024", "--out", str(tmp_path / "sweep")]
    first = subprocess.Popen(command, cwd=tmp_path, env=OFFLINE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    info = tmp_path / "sweep" / ".lock.info"
    deadline = time.time() + 120
    while time.time() < deadline and not (info.exists() and f'"pid": {first.pid}' in info.read_text()):
        time.sleep(0.02)
    second = subprocess.run(command, cwd=tmp_path, env=OFFLINE, capture_output=True, text=True, timeout=300)
    assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    assert second.returncode == 2
    assert f"being written by another sweep (pid {first.pid} on" in second.stderr and "--out" in second.stderr
    records = read_results(tmp_path / "sweep")[0]
    assert len(records) == len({r["run_id"] for r in records}) == len(ex.SEED_PROMPT_CONFIGS)  # each run once


def test_the_lock_refuses_a_second_holder_in_process_and_is_free_after(tmp_path):
    script = f"from bh_routing.folder import folder_lock\nwith folder_lock({str(tmp_path)!r}):\n    print('held', flush=True)\n    input()\n"
    holder = subprocess.Popen([sys.executable, "-c", script], env=OFFLINE, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(FolderBusyError, match=f"pid {holder.pid}"):
        with folder_lock(tmp_path, timeout=0.2):
            pass
    holder.kill()  # the OS releases a dead holder's lock: no stale lock to clean up
    holder.wait()
    with folder_lock(tmp_path):
        pass
