"""Set up funcdp in ./.venv and run its main job or its tests, on a machine with only Python.

    python3 run.py train [funcdp train options]   # DP-SGD on the built-in digits data set
    python3 run.py test [pytest options]          # the test suite

The first run creates the virtual environment, installs the CPU build of torch (an unpinned
torch would pull a CUDA build of several GB) and funcdp with its test extras; later runs reuse
it, and install again only when pyproject.toml has changed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
ENV = ROOT / ".venv"
TORCH = "torch==2.13.0"
COMMANDS = {"train": ["-m", "funcdp", "train"], "test": ["-m", "pytest", "-q"]}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python3 run.py {{{'|'.join(COMMANDS)}}} [options]", file=sys.stderr)
        return 2
    python = _environment()
    return subprocess.call([str(python), *COMMANDS[argv[0]], *argv[1:]], cwd=ROOT)


def _environment() -> Path:
    """The virtual environment's python, created and installed as needed."""
    python = ENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    stamp = ENV / ".funcdp-installed"
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    if not python.exists():
        print(f"creating {ENV}", file=sys.stderr)
        venv.create(ENV, with_pip=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    print(f"installing {TORCH} (CPU) and funcdp[test]", file=sys.stderr)
    subprocess.check_call([*pip, "--upgrade", "pip"])
    subprocess.check_call([*pip, TORCH])
    subprocess.check_call([*pip, "-e", f"{ROOT}[test]"])
    stamp.write_text(wanted)
    return python


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
