"""Resumable checkpoints: atomic tag directories, a `latest` pointer moved last, keep the last k.

Layout of a single-process (torch engine) checkpoint::

    RUN_DIR/checkpoints/step_00000100/state.pt    model, optimizer, scheduler, trainer state, meta
    RUN_DIR/checkpoints/step_00000100/config.json resolved config
    RUN_DIR/checkpoints/latest                    text: the newest complete tag

A DeepSpeed checkpoint (any world size) holds, in the same tag directory::

    engine/                  DeepSpeed's files: mp_rank_00_model_states.pt, one ZeRO optimizer shard per rank
    rank_00000.pt, ...       per rank: scheduler, loader position, mask RNG, trainer state with that rank's RNGs
    state.pt                 rank 0, written last: layout, world size, step, meta
    config.json              resolved config

A tag is written under a hidden temp name and renamed only when complete, and
`latest` is replaced (os.replace) after the rename, so a crash at any point
leaves the previous checkpoint loadable. With several ranks every rank writes
into the same temp directory (the run directory must be on a filesystem all
nodes share), and rank 0 renames it only after every rank has finished.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
LAYOUT_DEEPSPEED = "deepspeed"


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


class Barrier(Protocol):
    rank: int

    def barrier(self, what: str) -> None: ...


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def save_sharded_checkpoint(
    run_dir: Path,
    step: int,
    *,
    comm: Barrier,
    write_engine: Callable[[Path], None],
    rank_state: dict[str, Any],
    shared_state: dict[str, Any],
    config: dict[str, Any],
    keep_last: int,
) -> Path:
    """Collective: every rank writes its shard into one temp dir; rank 0 publishes it when all are done."""
    root = checkpoint_dir(run_dir)
    final = root / tag_for(step)
    # A name every rank can compute: no broadcast needed. A crashed attempt's leftover is cleared first.
    tmp = root / f".tmp-{final.name}"
    if comm.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    comm.barrier("checkpoint: temp dir ready")
    write_engine(tmp)
    torch.save(rank_state, tmp / rank_file(comm.rank))
    comm.barrier("checkpoint: every rank written")
    if comm.rank == 0:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        # state.pt marks the tag complete, so it is the last file in.
        torch.save({**shared_state, "layout": LAYOUT_DEEPSPEED}, tmp / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_text_atomic(root / "latest", final.name + "\n")
        prune_checkpoints(root, keep_last)
        log.info("checkpoint %s", final)
    comm.barrier("checkpoint: published")
    return final


def load_rank_state(path: Path, rank: int) -> dict[str, Any]:
    """One rank's part of a sharded checkpoint."""
    state_file = Path(path) / rank_file(rank)
    if not state_file.is_file():
        raise CheckpointError(f"no state for rank {rank} at {state_file} (was it written by fewer ranks?)")
    return torch.load(state_file, map_location="cpu", weights_only=False)


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
