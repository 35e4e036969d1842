"""Markdown for reports and notebooks: one table format, text made safe for a table cell."""
from __future__ import annotations

import html
import math
from typing import Sequence

import numpy as np
import pandas as pd


def escape(value) -> str:
    """Text safe inside a Markdown table cell: no HTML, no column break, one line."""
    return html.escape(str(value)).replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def as_markdown(text: str | Sequence[str]) -> str:
    """Markdown text; a list becomes bullet points."""
    return text if isinstance(text, str) else "\n".join(f"- {line}" for line in text)


def markdown_table(frame: pd.DataFrame, columns: Sequence[str] | None = None, digits: int = 4,
                   max_rows: int | None = None) -> str:
    """A GitHub Markdown table of ``columns`` (those present) of ``frame``: floats to ``digits``
    significant digits (with thousands separators from 10**digits), NaN/None as '–', booleans as
    yes/no, text escaped (:func:`escape`)."""
    if columns is not None:
        frame = frame[[c for c in columns if c in frame]]
    if max_rows is not None:
        frame = frame.head(max_rows)
    if frame.empty:
        return "_(no rows)_\n"

    def cell(value) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "–"
        if isinstance(value, (bool, np.bool_)):
            return "yes" if value else "no"
        if isinstance(value, (int, np.integer)):
            return f"{value:,}" if abs(value) >= 10000 else str(value)
        if isinstance(value, (float, np.floating)):
            if math.isinf(value):
                return "∞" if value > 0 else "−∞"
            return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:,.0f}"
        return escape(value)
    lines = ["| " + " | ".join(escape(c) for c in frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"
