"""Executes every notebook in `notebooks/` and fails on any cell error.

Each notebook runs top to bottom in a fresh kernel started from THIS interpreter (the kernel
spec below is pinned to `sys.executable`, so the notebooks see the same environment and the same
funcdp as the tests, whatever kernels the user has installed), with `notebooks/` as working
directory and matplotlib's non-interactive "Agg" backend. A notebook checks its own results with
`assert` cells, so executing it is a real test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

import funcdp

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
KERNEL_NAME = "python3"
CELL_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kernels folder holding one "python3" spec that runs ipykernel in this interpreter."""
    kernels = tmp_path_factory.mktemp("kernels")
    spec_dir = kernels / KERNEL_NAME
    spec_dir.mkdir()
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (funcdp tests)",
        "language": "python",
        "env": {"MPLBACKEND": "Agg"},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return kernels


def _execute(nb: nbformat.NotebookNode, kernel_dir: Path, cwd: Path) -> nbformat.NotebookNode:
    specs = KernelSpecManager(kernel_dirs=[str(kernel_dir)], ensure_native_kernel=False)
    km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)
    client = NotebookClient(
        nb,
        km=km,
        kernel_name=KERNEL_NAME,
        timeout=CELL_TIMEOUT_S,
        allow_errors=False,
        resources={"metadata": {"path": str(cwd)}},
    )
    return client.execute()


def _stdout(nb: nbformat.NotebookNode) -> str:
    return "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "stream" and out.get("name") == "stdout"
    )


def test_there_are_notebooks() -> None:
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOKS_DIR}"


def test_kernel_runs_this_interpreter(kernel_dir: Path, tmp_path: Path) -> None:
    probe = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell(
                "import os, sys, funcdp\n"
                "print(sys.executable)\nprint(os.getcwd())\nprint(os.environ['MPLBACKEND'])\n"
                "print(funcdp.__file__)"
            )
        ]
    )
    lines = _stdout(_execute(probe, kernel_dir, tmp_path)).splitlines()
    assert lines == [sys.executable, str(tmp_path), "Agg", funcdp.__file__]


def test_a_failing_cell_fails(kernel_dir: Path, tmp_path: Path) -> None:
    broken = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("assert 1 + 1 == 3, 'deliberate failure'")]
    )
    with pytest.raises(CellExecutionError, match="deliberate failure"):
        _execute(broken, kernel_dir, tmp_path)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path: Path, kernel_dir: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code_cells, f"{path.name} has no code cells"
    stored = [cell for cell in code_cells if cell.get("outputs") or cell.get("execution_count")]
    assert not stored, f"{path.name} is stored with outputs: clear them before committing"
    executed = _execute(nb, kernel_dir, NOTEBOOKS_DIR)
    assert all(cell.get("execution_count") for cell in executed.cells if cell.cell_type == "code")
