"""A sweep folder holds exactly one *context*, and one writer at a time.

The context (``context.json``) is everything that makes two runs comparable: the model (id or path
and a fingerprint of its weights), dtype, calibration fingerprint, budget (items, max_length and
new tokens per task), data versions and the bh_routing version. A sweep whose context differs from
the folder's is refused with what differs and what to do; nothing is mixed and nothing is deleted
(``move_aside`` renames an old folder when the user asks to start over).

Writers hold ``folder_lock`` (``filelock``: an OS lock, released by the kernel if the holder dies);
the holder's pid, host and command line sit in ``.lock.info`` so a refused writer can name it. The
processes of one ``accelerate launch`` (``distributed.Launch``) share it: the main process holds the
OS lock and writes its launch id into ``.lock.info``; the others *join* a lock that is held and names
their launch id, and refuse anything else. Appends from several processes are serialised by the
store's per-append lock.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from filelock import FileLock, Timeout

from .store import write_json

if TYPE_CHECKING:
    from .distributed import Launch

CONTEXT_FILE = "context.json"
LOCK_FILE = ".lock"
LOCK_INFO = ".lock.info"
RESTART_HINT = "--restart"  # the CLI flag that moves a folder aside
PER_TASK_KEYS = ("budget", "data")  # {task or dataset: setting}: compared where both have it; new ones join


class FolderBusyError(RuntimeError):
    """Another process is writing to the sweep folder."""


class ContextMismatchError(ValueError):
    """The sweep's context differs from the one the folder already holds."""


def _describe_holder(folder: Path) -> str:
    info = _read_lock_info(folder)
    if not info:
        return "a process that has not yet written its details"
    launch = f" (main process of a {info['processes']}-process launch)" if info.get("launch") else ""
    return f"pid {info.get('pid')} on {info.get('host')}{launch}, since {info.get('since')}: {info.get('command')}"


_HELD: set[Path] = set()  # folders this process holds: a nested folder_lock is a no-op


def _read_lock_info(folder: Path) -> dict:
    try:
        info = json.loads((folder / LOCK_INFO).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _join_launch(folder: Path, launch: "Launch") -> None:
    """A non-main process of ``launch`` joins the lock its main process holds, or is refused."""
    info = _read_lock_info(folder)
    if info.get("launch") != launch.launch_id:
        raise FolderBusyError(f"{folder} is not held by this launch's main process (held by "
                              f"{_describe_holder(folder)}): another sweep writes there, or the main "
                              "process stopped. Write to another folder (--out) or rerun the launch.")
    if info.get("host") == socket.gethostname():  # an OS lock is only visible on its own host
        probe = FileLock(folder / LOCK_FILE, timeout=0)
        try:
            probe.acquire()
        except Timeout:
            return  # held, by the process that wrote our launch id
        probe.release()
        raise FolderBusyError(f"{folder}: this launch's main process no longer holds the folder's lock; "
                              "rerun the launch to resume.")


@contextmanager
def folder_lock(folder: str | Path, timeout: float = 0, launch: "Launch | None" = None) -> Iterator[None]:
    """Hold ``folder``'s writer lock; raise FolderBusyError naming the holder after ``timeout`` seconds.

    ``launch``: the processes of one multi-process launch share the lock — its main process takes
    it (call this there first), the others join it (``_join_launch``)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a folder: pass a folder path (e.g. another --out)")
    folder.mkdir(parents=True, exist_ok=True)
    if folder.resolve() in _HELD:
        yield
        return
    if launch is not None and not launch.is_main:
        _join_launch(folder, launch)
        _HELD.add(folder.resolve())
        try:
            yield
        finally:
            _HELD.discard(folder.resolve())
        return
    lock = FileLock(folder / LOCK_FILE, timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise FolderBusyError(f"{folder} is being written by another sweep ({_describe_holder(folder)}). "
                              "Wait for it to finish, or write to another folder (--out).") from None
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "command": " ".join(sys.argv)}
        if launch is not None:
            info |= {"launch": launch.launch_id, "processes": launch.num_processes}
        write_json(folder / LOCK_INFO, info)
        _HELD.add(folder.resolve())
        yield
    finally:
        _HELD.discard(folder.resolve())
        lock.release()


def move_aside(folder: str | Path) -> Path | None:
    """Rename ``folder`` to ``<folder>.old-<time>`` (never deletes); None when there is no folder."""
    folder = Path(folder)
    if not folder.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, number = folder.with_name(f"{folder.name}.old-{stamp}"), 2
    while target.exists():
        target, number = folder.with_name(f"{folder.name}.old-{stamp}-{number}"), number + 1
    with folder_lock(folder):  # never move a folder that a sweep is writing
        pass
    folder.rename(target)
    return target


def read_context(folder: str | Path) -> dict | None:
    path = Path(folder) / CONTEXT_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ContextMismatchError(f"{path} is damaged ({error}); the folder's context cannot be checked. "
                                   f"Start over with {RESTART_HINT} (moves the folder aside) or use another --out."
                                   ) from None


def _normal(value: Any) -> Any:
    """JSON round trip: tuples become lists, keys strings, so stored and fresh contexts compare equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)
    return text if len(text) <= 120 else text[:117] + "..."


def context_differences(stored: Mapping, context: Mapping) -> list[str]:
    """What differs, one line per key; budget and data are compared per task (new tasks may join)."""
    stored, context = _normal(stored), _normal(context)
    lines = []
    for key in sorted(set(stored) | set(context)):
        old, new = stored.get(key), context.get(key)
        if key in PER_TASK_KEYS and isinstance(old, dict) and isinstance(new, dict):
            lines += [f"{key} of {task}: folder {_short(old[task])}, now {_short(new[task])}"
                      for task in sorted(set(old) & set(new)) if old[task] != new[task]]
        elif old != new:
            lines.append(f"{key}: folder {_short(old)}, now {_short(new)}")
    return lines


def check_context(folder: str | Path, context: Mapping, legacy_contexts: list[Mapping] = ()) -> dict | None:
    """Raise ContextMismatchError unless ``context`` agrees with the folder's (writes nothing);
    returns the stored context. ``legacy_contexts``: the contexts stored in the records of a folder
    made before context.json existed; they must all agree with ``context``."""
    folder = Path(folder)
    stored = read_context(folder)
    candidates = [stored] if stored is not None else list(legacy_contexts)
    for other in candidates:
        differences = context_differences(other, context)
        if differences:
            raise ContextMismatchError(
                f"{folder} holds results of another context, so the new runs would not be comparable with them:\n"
                + "\n".join(f"  - {line}" for line in differences)
                + f"\nWrite to a new folder (--out), or start over with {RESTART_HINT} (moves {folder} aside; "
                  "nothing is deleted).")
    return stored


def claim_context(folder: str | Path, context: Mapping, legacy_contexts: list[Mapping] = ()) -> dict:
    """Check ``context`` against the folder's (``check_context``) and record it (call under
    ``folder_lock``). Returns the folder's context (budget merged)."""
    folder = Path(folder)
    stored = check_context(folder, context, legacy_contexts)
    merged = _normal(context)
    for key in PER_TASK_KEYS:
        if stored is not None and isinstance(stored.get(key), dict):
            merged[key] = {**stored[key], **merged.get(key, {})}
    if merged != stored:
        write_json(folder / CONTEXT_FILE, merged)
    return merged
