"""Eval reads exports without the trainer: importing the export loader must not import it."""

from __future__ import annotations

import subprocess
import sys


def test_load_export_does_not_import_the_trainer() -> None:
    code = (
        "import sys; from pretrain.export import load_export; "
        "bad = [m for m in ('pretrain.trainer', 'pretrain.tracking', 'mlflow', 'deepspeed') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
