"""eval reads exports only: importing every eval module must not import the trainer or its tracking."""

from __future__ import annotations

import subprocess
import sys


def test_eval_never_imports_the_trainer() -> None:
    code = (
        "import sys, eval.suite, eval.run, eval.selfsup, eval.formats; "
        "bad = [m for m in ('pretrain.trainer', 'pretrain.tracking', 'mlflow', 'deepspeed') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
