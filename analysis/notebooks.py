"""Run an analysis notebook on a study and keep its figures: how the docs' figures are made, and what the tests run.

    python -m analysis.notebooks gates studies/ptb-cpu-grid --figures docs/fidelity/ptb

The study directory is injected after the notebook's `parameters` cell (papermill's convention), the kernel runs in
a directory of its own (a notebook must not depend on being run from the repository), and every PNG it displays is
written as `<figures>/<notebook>_<k>.png`, k counting from 1 in display order. Needs the `notebooks` extra.
"""
from __future__ import annotations

import argparse
import base64
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
NOTEBOOKS = ("pareto_lm", "pareto_nmt", "gates")


def execute(name: str, study_dir: str | os.PathLike, cwd: str | os.PathLike, *, timeout: int = 600
            ) -> nbformat.NotebookNode:
    """Run `analysis/<name>.ipynb` top to bottom with STUDY_DIR = `study_dir`; returns the executed notebook."""
    nb = nbformat.read(HERE / f"{name}.ipynb", as_version=4)
    params = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    if len(params) != 1 or nb.cells[params[0]].cell_type != "code":
        raise ValueError(f"{name}.ipynb must have exactly one code cell tagged `parameters`")
    injected = nbformat.v4.new_code_cell(f"STUDY_DIR = {os.fspath(study_dir)!r}",
                                         metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(params[0] + 1, injected)
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def figures(nb: nbformat.NotebookNode) -> list[bytes]:
    """The PNG images the executed notebook displayed, in order."""
    return [base64.b64decode(out["data"]["image/png"]) for cell in nb.cells for out in cell.get("outputs", [])
            if "image/png" in out.get("data", {})]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.notebooks", description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook", choices=NOTEBOOKS)
    parser.add_argument("study_dir")
    parser.add_argument("--figures", type=Path, required=True, help="directory for the PNGs")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as cwd:
        nb = execute(args.notebook, Path(args.study_dir).resolve(), cwd)
    args.figures.mkdir(parents=True, exist_ok=True)
    for k, png in enumerate(figures(nb), start=1):
        path = args.figures / f"{args.notebook}_{k}.png"
        path.write_bytes(png)
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
