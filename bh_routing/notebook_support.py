"""What a notebook does with results: Markdown tables and readings displayed, figures shown, JSON
and a Markdown report written, the results folder zipped and, on Colab, downloaded."""
from __future__ import annotations

import os
import time
import zipfile
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .markdown import as_markdown
from .runtime import in_colab
from .session import Session

# =========================================================================== results


def write_report(path: str | os.PathLike, title: str, session: Session | None, blocks: Sequence[str],
                 figures: Sequence[tuple[str, str]] = ()) -> Path:
    """A Markdown report: title, the session's settings, ``blocks`` (Markdown, in order), then the
    ``figures`` as (file name relative to the report, caption); by default the figures the session
    registered (:meth:`Session.figure`)."""
    path = Path(path)
    lines = [f"# {title}", ""]
    if session is not None:
        lines += [session.markdown(), "", f"_Generated {time.strftime('%Y-%m-%d %H:%M:%S')} by bh_routing "
                  f"{__version__}; every number below was computed by this run._", ""]
    lines += [block.rstrip() + "\n" for block in blocks]
    figures = list(figures) or (list(session.figures) if session is not None else [])
    if figures:
        lines += ["## Figures", ""] + [f"![{caption}]({name})\n\n*{caption}*\n" for name, caption in figures]
    from .store import write_atomic
    write_atomic(path, "\n".join(lines))
    return path


def display_markdown(text: str | Sequence[str]) -> None:
    """Render Markdown in a notebook (printed elsewhere). A list becomes bullet points."""
    text = as_markdown(text)
    try:
        from IPython.display import Markdown, display
        display(Markdown(text))
    except ImportError:
        print(text)


def write_json(path: str | os.PathLike, value: Any) -> Path:
    from .store import write_json as write
    write(path, value)
    return Path(path)


def zip_folder(folder: str | os.PathLike, exclude_dirs: Sequence[str] = ("runs",),
               suffixes: Sequence[str] = (".json", ".jsonl", ".csv", ".png", ".md", ".safetensors", ".txt")) -> Path:
    """Zip ``folder`` (files with ``suffixes``, skipping sub-folders named in ``exclude_dirs`` — the
    per-run token arrays of a sweep stay on disk for resuming) to ``<folder>.zip``."""
    folder = Path(folder)
    target = folder.with_suffix(".zip")
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder)
            if not path.is_file() or any(part in exclude_dirs for part in relative.parts[:-1]):
                continue
            if path.suffix in suffixes:
                archive.write(path, Path(folder.name) / relative)
    return target


def offer_download(path: str | os.PathLike) -> str:
    """On Colab, download ``path`` to the user's machine; elsewhere say where it is."""
    path = Path(path)
    if in_colab():
        from google.colab import files  # type: ignore[import-not-found]
        files.download(str(path))
        return f"downloading {path.name} ({path.stat().st_size / 1e6:.1f} MB)"
    return f"not on Colab: the results are at {path} ({path.stat().st_size / 1e6:.1f} MB)"
