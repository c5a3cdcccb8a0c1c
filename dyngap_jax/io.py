"""Files the project writes: text and JSON atomically (temporary name, then rename), PNG figures.

A crash or kill never leaves a half-written file under the final name. Figures are made with
``matplotlib.figure.Figure`` directly, never through ``pyplot``'s global state, so the library
never changes the backend of a user's notebook and never leaves figures open.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ""):
    """Yield a temporary file name beside ``path``; on success rename it to ``path``, on failure remove it."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix or os.path.basename(path))
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder, fsync and a rename."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str, obj: Any, indent: int | None = 2) -> None:
    """``obj`` as JSON (NumPy scalars as floats), atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, default=float))


def new_figure(nrows: int = 1, ncols: int = 1, figsize=(5, 3.5), squeeze: bool = True):
    """``(figure, axes)`` like ``plt.subplots``, on a figure no backend or pyplot state knows about."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def save_figure(fig, path: str, dpi: int = 110) -> None:
    """Write ``fig`` as PNG under a temporary name and rename it into place."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")


def json_differences(a, b, rtol: float, path: str = "") -> list[str]:
    """Where two JSON values differ (numbers within ``rtol``): one line each, naming the path (a resumed run against
    the uninterrupted one in ``scripts.chaos`` and the tests)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}: only in one" for k in set(a) ^ set(b)]
        return out + [d for k in sorted(set(a) & set(b)) for d in json_differences(a[k], b[k], rtol, f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} against {len(b)} entries"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in json_differences(x, y, rtol, f"{path}[{i}]")]
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        ok = a == b or abs(a - b) <= rtol * max(abs(a), abs(b))
        return [] if ok else [f"{path}: {a} against {b}"]
    return [] if a == b else [f"{path}: {a!r} against {b!r}"]
