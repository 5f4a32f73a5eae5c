"""Reading training data: files, CSV series, checksums, the embedded sunspots.

Shared by the tasks of :mod:`kernrnn.train.data`; :class:`EpochData` is what
a task hands the trainer.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import stat
from dataclasses import dataclass
from importlib import resources

import numpy as np

__all__ = ["EpochData", "read_csv_series", "load_sunspots"]


EMBEDDED = "sunspots"


@dataclass
class EpochData:
    x: np.ndarray
    y: np.ndarray
    lengths: np.ndarray

    @property
    def size(self) -> int:
        return int(self.lengths.shape[0])


def _fraction(value, name):
    v = float(value)
    if not 0.0 < v < 1.0:
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {value!r}")
    return v


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_bytes(path) -> bytes:
    """The bytes of a regular file; a FIFO, device or socket is refused before it is opened.

    (Opening a FIFO blocks until someone writes to it: the run would hang.)
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"data file {path!r} is a directory, expected a file")
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError(f"data file {path!r} is not a regular file (a FIFO, device or "
                         f"socket), expected a file")
    with open(path, "rb") as f:
        return f.read()


# -- CSV time series ----------------------------------------------------------


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def read_csv_series(text: str, column=None, name="CSV data"):
    """Parse a numeric column out of CSV text.

    The first non-empty row is a header when any of its fields is not a number.
    ``column`` is a header name or a 0-based index (default: the last column).
    Returns ``(values float64 [N], labels list[str] | None, column_name)``;
    ``labels`` is the first column when it is not the value column (years,
    dates), used to label forecasts.  Every problem names the line.
    """
    rows = []
    reader = csv.reader(io.StringIO(text))
    try:
        for row in reader:
            if not row or all(not f.strip() for f in row) or row[0].lstrip().startswith("#"):
                continue
            rows.append((reader.line_num, [f.strip() for f in row]))
    except csv.Error as e:  # e.g. a field over csv.field_size_limit(), an unclosed quote
        raise ValueError(f"{name} line {reader.line_num}: not valid CSV ({e})") from None
    if not rows:
        raise ValueError(f"{name} has no data rows (empty file?)")
    header = None
    if not all(_is_number(f) for f in rows[0][1]):
        header = rows[0][1]
        rows = rows[1:]
    if not rows:
        raise ValueError(f"{name} has a header line but no data rows")
    width = len(header) if header is not None else len(rows[0][1])
    for lineno, row in rows:
        if len(row) != width:
            raise ValueError(
                f"{name} line {lineno}: expected {width} comma-separated fields "
                f"(as the {'header' if header else 'first row'}), got {len(row)}"
            )
    if column is None:
        col = width - 1
    elif isinstance(column, str) and not column.lstrip("-").isdigit():
        if header is None or column not in header:
            raise ValueError(
                f"{name}: no column named {column!r}; "
                + (f"columns are {header}" if header else "the file has no header line")
            )
        col = header.index(column)
    else:
        col = int(column)
        if not 0 <= col < width:
            raise ValueError(f"{name}: column index must lie in [0, {width}), got {col}")
    values = np.empty(len(rows))
    for i, (lineno, row) in enumerate(rows):
        field = row[col]
        try:
            v = float(field)
        except ValueError:
            raise ValueError(
                f"{name} line {lineno}, column {col}: {field!r} is not a number"
            ) from None
        if not math.isfinite(v):
            raise ValueError(f"{name} line {lineno}, column {col}: {field!r} is not finite")
        values[i] = v
    labels = [row[0] for _, row in rows] if col != 0 and width > 1 else None
    col_name = header[col] if header is not None else f"column {col}"
    return values, labels, col_name


def load_sunspots():
    """The embedded yearly sunspot series: ``(values, years, column, sha256)``."""
    data = resources.files("kernrnn.train").joinpath("datasets", "sunspots.csv").read_bytes()
    values, labels, col = read_csv_series(data.decode("utf-8"), name="sunspots.csv")
    return values, labels, col, _sha256(data)


def _check_sha(source, sha, expect_sha):
    if expect_sha is not None and sha != expect_sha:
        raise ValueError(
            f"data {source!r} has changed since the checkpoint was written "
            f"(sha256 {sha[:12]}..., checkpoint has {expect_sha[:12]}...)"
        )
