"""The support matrix: what every registered op's backends declare they can run, as a markdown table
(``python -m unispeech_kernels.info --matrix``). README's "What runs where" is this table, written
between its markers by ``--matrix --readme README.md``; a test fails when they differ."""
from __future__ import annotations

import re

from .dispatch import BACKEND_NAMES, RUNTIMES, Backend, dtype_names
from .ops import registered_ops

BEGIN, END = "<!-- support-matrix -->", "<!-- /support-matrix -->"
HEADER = ("op", "backend", "runs on", "dtypes", "activation", "features", "limits", "also needs", "picked")


def _first_line(fn) -> str:
    return (fn.__doc__ or fn.__name__).strip().split("\n")[0].rstrip(".")


def _limits(limits) -> str:
    if callable(limits):
        return f"the extension's ({limits.__name__})"
    return "; ".join(f"{name} <= {largest}" for name, largest in limits) or "-"


def _cells(backend: Backend) -> tuple:
    runs_on = RUNTIMES[backend.runtime].format(cc="%d%d" % backend.min_capability)
    features = ", ".join(backend.features) or "forward only"
    also = _first_line(backend.not_supported_reasons) if backend.not_supported_reasons else "-"
    return (runs_on, dtype_names(backend.dtypes) if backend.dtypes else "any",
            " / ".join(backend.activations) or "any", features, _limits(backend.limits), also)


def _parts(backend: Backend) -> list:
    """A composite backend's rows: one per part, labelled as its inputs are."""
    rows = []
    for what, part, _ in backend.parts:
        rows.append((f"{what}: {part.op} {part.name}",) + _cells(part))
    return rows


def matrix_rows() -> list:
    rows = []
    for op in registered_ops():
        for name in BACKEND_NAMES:
            backend = op.backends.get(name)
            if backend is None:
                continue
            picked = "yes" if backend.auto else "forced only"
            if backend.parts:
                for part_name, *cells in _parts(backend):
                    rows.append((op.name, f"{name} ({part_name})", *cells, picked))
            else:
                rows.append((op.name, name, *_cells(backend), picked))
    return rows


def support_matrix() -> str:
    """The markdown table of every registered op's backends, in preference order."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in matrix_rows()]
    return "\n".join(lines)


_SECTION = re.compile(re.escape(BEGIN) + r"\n(.*?)\n?" + re.escape(END), re.S)


def readme_section(text: str) -> str:
    """The support-matrix section of a README's text (between the markers, without them)."""
    match = _SECTION.search(text)
    if match is None:
        raise ValueError(f"no {BEGIN} ... {END} section")
    return match.group(1)


def write_readme(path: str) -> None:
    """Write the support matrix between the README's markers."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    readme_section(text)  # the markers are there
    text = _SECTION.sub(lambda _: f"{BEGIN}\n{support_matrix()}\n{END}", text, count=1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
