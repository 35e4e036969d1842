"""Checkpointed results: an append-only JSON-lines file that survives being killed at any moment.

One line per finished run, written with a single ``write`` + flush + fsync, so a kill leaves either
the whole line or a torn last line. Reading never trusts the file: a line that is not UTF-8, not
JSON, not an object, or lacks a safe ``run_id`` / a ``status`` is *damaged*. Readers skip damaged
lines and name them (file:line and why); a writer (:class:`ResultStore`) copies the whole damaged
file to a kept side file (``results.jsonl.bad``, ``.bad.2``, ...) before rewriting it without those
lines, so their runs simply run again and nothing is ever lost. Several processes of one launch may
append at once: each append holds ``results.jsonl.lock`` (``filelock``) and starts on a fresh line
if a killed writer left a torn one, so no two records share a line. Summaries are written to a temporary
file and renamed over the old one. Works on a local disk and on a mounted Google Drive folder.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

RESULTS_FILE = "results.jsonl"
APPEND_LOCK = RESULTS_FILE + ".lock"
APPEND_LOCK_TIMEOUT = 120  # seconds: an append takes milliseconds; longer means a stuck file system
STATUSES = ("ok", "failed")
_SAFE_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # a plain file name: no dots, slashes


class DamagedResultsWarning(UserWarning):
    """Some lines of a results file could not be used (they are named in the message)."""


def check_run_id(run_id: Any) -> str:
    """``run_id`` names files under ``runs/``: only letters, digits, ``_`` and ``-`` (no path)."""
    if not isinstance(run_id, str) or not _SAFE_RUN_ID.fullmatch(run_id):
        raise ValueError(f"run_id must be 1-64 letters, digits, '_' or '-' (a plain file name), got {run_id!r}")
    return run_id


def _fsync_folder(folder: Path) -> None:
    try:  # make the rename itself durable; not every file system (or OS) allows opening a folder
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, content: str | bytes) -> None:
    """Replace ``path`` with ``content`` so that readers see the old or the new file, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    data = content.encode("utf-8") if isinstance(content, str) else content
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_folder(path.parent)


def write_json(path: str | Path, value: Any) -> None:
    write_atomic(path, json.dumps(value, indent=1, ensure_ascii=False, default=str, allow_nan=True) + "\n")


@dataclass(frozen=True)
class DamagedLine:
    path: Path
    line: int  # 1-based
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


def _record_problem(record: Any) -> str | None:
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not a run record (an object)"
    try:
        check_run_id(record.get("run_id"))
    except ValueError as error:
        return str(error)
    if record.get("status") not in STATUSES:
        return f"status must be one of {STATUSES}, got {record.get('status')!r}"
    return None


def parse_results(raw: bytes, path: Path) -> tuple[list[dict], list[DamagedLine], list[bytes]]:
    """(usable records in file order, damaged lines, the usable lines' bytes)."""
    records, damaged, good = [], [], []
    lines = raw.split(b"\n")
    tail = lines.pop()  # the bytes after the last newline: a torn line if not empty
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as error:
            damaged.append(DamagedLine(path, number, f"not UTF-8 text (byte {error.start + 1})"))
            continue
        except json.JSONDecodeError as error:
            damaged.append(DamagedLine(path, number, f"not JSON ({error.msg}, column {error.colno})"))
            continue
        problem = _record_problem(record)
        if problem:
            damaged.append(DamagedLine(path, number, problem))
            continue
        records.append(record)
        good.append(line)
    if tail.strip():
        damaged.append(DamagedLine(path, len(lines) + 1, "cut off (no final newline: its writer was stopped mid-line)"))
    return records, damaged, good


def read_results(folder: str | Path) -> tuple[list[dict], list[DamagedLine]]:
    """Read-only: the usable records of ``folder/results.jsonl`` and its damaged lines (never writes)."""
    path = Path(folder) / RESULTS_FILE
    if not path.is_file():
        return [], []
    records, damaged, _ = parse_results(path.read_bytes(), path)
    return records, damaged


def latest_by_run(records: list[dict]) -> dict[str, dict]:
    """The last record of every run id (a retried run's newer record wins)."""
    return {record["run_id"]: record for record in records}


def _free_side_name(path: Path) -> Path:
    side = path.with_name(path.name + ".bad")
    number = 2
    while side.exists():
        side = path.with_name(f"{path.name}.bad.{number}")
        number += 1
    return side


class ResultStore:
    """``<folder>/results.jsonl`` opened for writing (hold the folder's lock: see ``folder.folder_lock``).

    Opening sets damaged lines aside (kept copy of the whole file, then the file without them) and
    warns with each one's file:line and reason; ``self.damaged`` lists them, ``self.side_file`` is the copy.
    ``set_aside=False``: leave the file as it is (the non-main processes of a launch, whose main
    process has set damaged lines aside before they open it).
    """

    def __init__(self, folder: str | Path, set_aside: bool = True):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(f"{self.folder} is a file, not a folder: pass a folder path (e.g. another --out)")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / RESULTS_FILE
        self.damaged: list[DamagedLine] = []
        self.side_file: Path | None = None
        if set_aside:
            self._set_damaged_aside()

    def _set_damaged_aside(self) -> None:
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        _, self.damaged, good = parse_results(raw, self.path)
        if not self.damaged:
            return
        self.side_file = _free_side_name(self.path)
        write_atomic(self.side_file, raw)  # the kept copy first: a kill between the two steps loses nothing
        write_atomic(self.path, b"".join(line + b"\n" for line in good))
        listing = "\n".join(f"  {d}" for d in self.damaged)
        warnings.warn(f"{len(self.damaged)} damaged line(s) set aside (the original file is kept as "
                      f"{self.side_file}); their runs will run again:\n{listing}", DamagedResultsWarning, stacklevel=2)

    def records(self) -> list[dict]:
        records, _ = read_results(self.folder)
        return records

    def latest(self) -> dict[str, dict]:
        return latest_by_run(self.records())

    def append(self, record: dict) -> None:
        problem = _record_problem(record)
        if problem:
            raise ValueError(f"not a valid run record: {problem}")
        line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        with FileLock(self.folder / APPEND_LOCK, timeout=APPEND_LOCK_TIMEOUT), open(self.path, "ab+") as f:
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a writer killed mid-line: keep its fragment a line of its own
                    line = b"\n" + line
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
