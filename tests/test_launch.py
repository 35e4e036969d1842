"""One sweep across the processes of a real ``accelerate launch``: the shared folder lock, appends from
several processes, and a 2-process launch killed mid-way and resumed, equal to a one-process sweep."""
from __future__ import annotations

import json
import math
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bh_routing.distributed import Launch
from bh_routing.folder import FolderBusyError, folder_lock
from bh_routing.models import TINY_MODEL_DIR
from bh_routing.report import build_report
from bh_routing.store import RESULTS_FILE, ResultStore, read_results
from test_sweep_folder import OFFLINE

ACCELERATE = Path(sys.executable).with_name("accelerate")


def _holder(folder: Path, launch: Launch) -> subprocess.Popen:
    """A process holding ``folder``'s lock as the main process of ``launch`` until killed."""
    script = (f"from bh_routing.distributed import Launch\nfrom bh_routing.folder import folder_lock\n"
              f"with folder_lock({str(folder)!r}, launch=Launch(*{tuple(vars(launch).values())!r})):\n"
              "    print('held', flush=True)\n    input()\n")
    holder = subprocess.Popen([sys.executable, "-c", script], env=OFFLINE, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_processes_of_one_launch_share_the_lock_and_everyone_else_is_refused(tmp_path):
    ours = Launch("launch-a", 0, 2, "cpu")
    holder = _holder(tmp_path, ours)
    try:
        with folder_lock(tmp_path, launch=Launch("launch-a", 1, 2, "cpu")):  # a process of the same launch joins
            pass
        with pytest.raises(FolderBusyError, match=f"pid {holder.pid} .*main process of a 2-process launch"):
            with folder_lock(tmp_path, launch=Launch("launch-b", 1, 2, "cpu")):  # another launch's process
                pass
        with pytest.raises(FolderBusyError, match="being written by another sweep"):
            with folder_lock(tmp_path, launch=Launch("launch-b", 0, 2, "cpu")):  # another launch's main
                pass
        with pytest.raises(FolderBusyError, match="being written by another sweep"):
            with folder_lock(tmp_path):  # a one-process sweep
                pass
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(FolderBusyError, match="no longer holds"):  # its main process died: nothing to join
        with folder_lock(tmp_path, launch=Launch("launch-a", 1, 2, "cpu")):
            pass


def _record(run_id: str, payload: str) -> dict:
    return {"run_id": run_id, "status": "ok", "payload": payload}


def test_an_append_after_a_torn_line_starts_a_new_line(tmp_path):
    (tmp_path / RESULTS_FILE).write_bytes(json.dumps(_record("a", "x")).encode() + b"\n" + b'{"run_id": "b", "sta')
    ResultStore(tmp_path, set_aside=False).append(_record("c", "y"))  # a process that must not rewrite the file
    records, damaged = read_results(tmp_path)
    assert [r["run_id"] for r in records] == ["a", "c"]
    assert [(d.line, d.reason.split(" ")[0]) for d in damaged] == [(2, "not")]  # the fragment alone, no merge


def test_concurrent_appends_from_several_processes_keep_every_line_whole(tmp_path):
    """Records far larger than a pipe's atomic write (64 KiB lines), 2 processes x 40 each."""
    script = ("import sys\nfrom bh_routing.store import ResultStore\nstore = ResultStore(sys.argv[1], set_aside=False)\n"
              "for i in range(40):\n    store.append({'run_id': f'{sys.argv[2]}-{i}', 'status': 'ok', "
              "'payload': sys.argv[2] * 65536})\n")
    writers = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), name], env=OFFLINE) for name in "pq"]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    records, damaged = read_results(tmp_path)
    assert not damaged
    assert sorted(r["run_id"] for r in records) == sorted(f"{n}-{i}" for n in "pq" for i in range(40))
    assert all(r["payload"] == r["run_id"][0] * 65536 for r in records)


# --------------------------------------------------------------------------- a real 2-process launch

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_command(out: Path) -> list[str]:
    # --multi_gpu is accelerate's torchrun launcher; without a GPU its processes run on the CPU
    # (``accelerate launch --cpu`` starts several processes only through mpirun).
    return [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
            "-m", "bh_routing", "sweep", "--preset", "deep-dive", "--budget", "smoke", "--out", str(out),
            "--calibration-tokens", "1024"]


def _worker(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "bh_routing" in " ".join(child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no worker of rank {rank}")


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.slow  # ~60 s on 2 cores: two launches and a one-process reference sweep
@pytest.mark.skipif(not (Path(TINY_MODEL_DIR) / "model.safetensors").exists(), reason="no bundled tiny model")
def test_a_two_process_launch_killed_mid_way_resumes_and_equals_a_one_process_sweep(tmp_path):
    out = tmp_path / "sweep"
    launcher = subprocess.Popen(_launch_command(out), cwd=tmp_path, env=OFFLINE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while _lines(out / RESULTS_FILE) < 10 and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert launcher.poll() is None, launcher.stderr.read()[-3000:]
    _worker(launcher, rank=1).send_signal(signal.SIGKILL)  # the launcher then stops the other process
    assert launcher.wait(timeout=120) != 0
    first = read_results(out)[0]
    planned = json.loads((out / "sweep.json").read_text())["n_runs"]
    assert 10 <= len(first) < planned
    assert {r["process"]["index"] for r in first} == {0, 1}

    resumed = subprocess.run(_launch_command(out), cwd=tmp_path, env=OFFLINE, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records, damaged = read_results(out)
    assert not damaged
    runs = {r["run_id"] for r in records}
    assert len(runs) == len(records) == planned  # every run once: none finished before the kill was redone
    assert all(r["status"] == "ok" for r in records)
    second = [r for r in records if r["process"]["launch"] != first[0]["process"]["launch"]]
    assert len(second) == planned - len(first) and {r["process"]["index"] for r in second} == {0, 1}
    assert len(build_report(out).ok) == planned  # the report merges both processes and both launches

    reference = tmp_path / "one-process"  # the same calibration: the same contexts and run ids
    single = subprocess.run([sys.executable, "-m", "bh_routing", "sweep", "--preset", "deep-dive", "--budget", "smoke",
                             "--calibration", str(out / "calibration.safetensors"), "--out", str(reference)],
                            cwd=tmp_path, env=OFFLINE, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    expected = {r["run_id"]: r for r in read_results(reference)[0]}
    assert set(expected) == runs
    for record in records:
        want = expected[record["run_id"]]
        assert record["experts"]["mean_experts"] == pytest.approx(want["experts"]["mean_experts"], rel=1e-7)
        for name, value in want["metrics"].items():
            assert math.isclose(record["metrics"][name], value, rel_tol=1e-7, abs_tol=1e-9), (record["label"], name)
