"""Resumable checkpoints: atomic tag directories, a `latest` pointer moved last, keep the last k.

Layout::

    RUN_DIR/checkpoints/step_00000100/state.pt    model, optimizer, scheduler, trainer state
    RUN_DIR/checkpoints/step_00000100/config.json resolved config
    RUN_DIR/checkpoints/latest                    text: the newest complete tag

A tag is written under a hidden temp name and renamed only when complete, and
`latest` is replaced (os.replace) after the rename, so a crash at any point
leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match this run."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], config: dict[str, Any], keep_last: int) -> Path:
    """Write a complete tag directory, then move `latest`, then prune old tags."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / tag_for(step)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{final.name}-"))
    try:
        torch.save(state, tmp / STATE_FILE)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_text_atomic(root / "latest", final.name + "\n")
    prune_checkpoints(root, keep_last)
    log.info("checkpoint %s", final)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / STATE_FILE).is_file())


def prune_checkpoints(root: Path, keep_last: int) -> None:
    latest = read_latest(root.parent)
    for path in list_checkpoints(root)[:-keep_last]:
        if latest is not None and path == latest:
            continue
        shutil.rmtree(path, ignore_errors=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def read_latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None when it has none."""
    root = checkpoint_dir(run_dir)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{pointer} points at {path}, which is not a complete checkpoint")
    return path


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, config dict) of one tag directory."""
    state_file = Path(path) / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"no checkpoint state at {state_file}")
    state = torch.load(state_file, map_location="cpu", weights_only=False)
    config = json.loads((Path(path) / "config.json").read_text())
    return state, config
