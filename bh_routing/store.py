"""Checkpointed results: an append-only JSON-lines file that survives being killed at any moment.

One line per finished run, written with a single ``write`` + flush + fsync, so a kill leaves either
the whole line or a torn last line; a torn line is cut off on the next open (it was never finished,
so its run simply runs again). Summaries are written to a temporary file and renamed over the old
one. Works on a local disk and on a mounted Google Drive folder.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

RESULTS_FILE = "results.jsonl"


def write_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that readers see the old or the new file, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str | Path, value: Any) -> None:
    write_atomic(path, json.dumps(value, indent=1, ensure_ascii=False, default=str, allow_nan=True) + "\n")


class ResultStore:
    """``<folder>/results.jsonl``: one JSON object per finished run, keyed by ``run_id``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / RESULTS_FILE
        self._drop_torn_tail()

    def _drop_torn_tail(self) -> None:
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        if raw and not raw.endswith(b"\n"):
            write_atomic(self.path, raw[: raw.rfind(b"\n") + 1].decode("utf-8"))

    def records(self) -> Iterator[dict]:
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)

    def latest(self) -> dict[str, dict]:
        """The last record of every run id (a retried run's newer record wins)."""
        return {record["run_id"]: record for record in self.records()}

    def append(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
