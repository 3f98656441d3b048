"""Resumable checkpoints: atomic tag directories with a checksum manifest, a `latest` pointer, keep the last k.

Layout of a single-process (torch engine) checkpoint::

    RUN_DIR/checkpoints/step_00000100/state.pt       model, optimizer, scheduler, trainer state, meta
    RUN_DIR/checkpoints/step_00000100/config.json    resolved config
    RUN_DIR/checkpoints/step_00000100/manifest.json  sha256 and size of every other file, written last
    RUN_DIR/checkpoints/latest                       text: the newest complete tag

A DeepSpeed checkpoint (any world size) holds, in the same tag directory::

    engine/                  DeepSpeed's files: mp_rank_00_model_states.pt, one ZeRO optimizer shard per rank
    rank_00000.pt, ...       per rank: scheduler, loader position, mask RNG, trainer state with that rank's RNGs
    state.pt                 rank 0: layout, world size, step, meta
    config.json              resolved config
    manifest.json            as above

A tag is written under a hidden temp name and renamed only when complete
(``manifest.json`` is its last file), and `latest` is replaced after the
rename, so a crash at any point leaves the previous checkpoint loadable. With
several ranks every rank writes into the same temp directory (the run
directory must be on a filesystem all nodes share), and rank 0 renames it only
after every rank has finished.

Safety. No checkpoint file is ever unpickled unrestricted: the project's own
files are read with ``torch.load(weights_only=True)``; DeepSpeed's files,
which DeepSpeed reads itself, are first scanned for the globals their pickles
name, and any outside a short allow-list (tensors, plain containers, three
DeepSpeed bookkeeping types) makes the checkpoint refused before a byte of
it is unpickled. A checkpoint whose files do not match their manifest is
skipped on resume (the newest one that verifies is used) and refused by export.

This module is the file format; ``pretrain.checkpointer.Checkpointer`` decides
when a run saves, which checkpoint it resumes from and whether it may.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch

from data_shards.io import file_sha256, make_temp_dir, publish_dir, write_text_atomic

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "video-pretrain-checkpoint/1"
LAYOUT_DEEPSPEED = "deepspeed"
# Files the trainer rewrites atomically in the run directory itself; a kill can leave their temporaries.
RUN_DIR_FILES = (CONFIG_FILE, "heldout.json")

# Globals a checkpoint's pickles may name beyond torch's own weights-only set.
# numpy's: trainer RNG state in checkpoints written before RNG state became tensors.
_NUMPY_GLOBALS = [np.ndarray, np.dtype, np.dtypes.UInt32DType]
_NUMPY_RECONSTRUCT_NAMES = ("numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct")
# DeepSpeed's ZeRO optimizer shards pickle these (plain data holders, no code on load).
DEEPSPEED_GLOBALS = frozenset(
    {
        "deepspeed.utils.tensor_fragment.fragment_address",
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
    }
)

ResumeMode = Literal["never", "auto", "must"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, unsafe or does not match this run."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


# ---- reading pickles safely ----
def _numpy_safe_globals() -> list[Any]:
    names = []
    for dotted in _NUMPY_RECONSTRUCT_NAMES:
        module, _, name = dotted.rpartition(".")
        try:
            names.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            continue
    return [*_NUMPY_GLOBALS, *names]


def safe_torch_load(path: Path) -> Any:
    """``torch.load`` restricted to tensors and plain data; anything else is a CheckpointError naming the file."""
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise CheckpointError(f"{path} is missing") from err
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"refusing to load {path}: it holds more than tensors and plain data ({first})") from err
    except Exception as err:
        # The weights-only unpickler raises whatever garbage bytes provoke (IndexError, KeyError, ...).
        raise CheckpointError(f"{path} is unreadable (truncated or not a checkpoint): {err!r}") from err


def check_pickle_globals(path: Path, allowed: frozenset[str] = DEEPSPEED_GLOBALS) -> None:
    """Refuse a torch file whose pickle names any global outside torch's weights-only set and ``allowed``.

    Reads the pickle's opcodes only (no tensor data, nothing executed), so a
    file can be vetted before a library that loads it unrestricted (DeepSpeed)
    sees it.
    """
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except FileNotFoundError as err:
        raise CheckpointError(f"{path} is missing") from err
    except Exception as err:  # the scanner raises plain Exceptions for malformed pickles
        raise CheckpointError(f"refusing to load {path}: unreadable or unexpected pickle ({err})") from err
    unknown = sorted(unsafe - allowed)
    if unknown:
        raise CheckpointError(f"refusing to load {path}: its pickle would import {', '.join(unknown)}")


def read_json(path: Path) -> Any:
    """A JSON file, or a CheckpointError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"{path} is missing") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err


# ---- the checksum manifest ----
def _payload_files(tag_dir: Path) -> list[Path]:
    return sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def write_manifest(tag_dir: Path) -> None:
    """sha256 and size of every file in the tag directory; the last file written before the rename."""
    files = {
        p.relative_to(tag_dir).as_posix(): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
        for p in _payload_files(tag_dir)
    }
    write_text_atomic(tag_dir / MANIFEST_FILE, json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1))


def verify_checkpoint(tag_dir: Path) -> None:
    """Raise CheckpointError unless every file the manifest lists is present with its recorded sha256."""
    tag_dir = Path(tag_dir)
    if not (tag_dir / STATE_FILE).is_file():
        raise CheckpointError(f"{tag_dir} is not a complete checkpoint (no {STATE_FILE})")
    manifest_path = tag_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        # Written before checkpoints carried checksums: usable, but nothing can vouch for its bytes.
        log.warning("%s has no %s (an older checkpoint): its files cannot be verified", tag_dir, MANIFEST_FILE)
        return
    manifest = read_json(manifest_path)
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{manifest_path}: not a checkpoint manifest")
    for name, record in manifest["files"].items():
        path = tag_dir / name
        if not path.is_file():
            raise CheckpointError(f"{tag_dir}: {name} is missing")
        if path.stat().st_size != record["bytes"] or file_sha256(path) != record["sha256"]:
            raise CheckpointError(f"{tag_dir}: {name} does not match its checksum (corrupted on disk?)")


# ---- writing ----
def _publish_tag(tmp: Path, final: Path, root: Path, keep_last: int) -> None:
    """Manifest last, rename into place, then move `latest`, then prune older tags."""
    write_manifest(tmp)
    publish_dir(tmp, final)
    write_text_atomic(root / "latest", final.name + "\n")
    # The tag just written was hashed from disk a moment ago: it is the newest that verifies.
    prune_checkpoints(root, keep_last, keep=final)
    log.info("checkpoint %s", final)


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], config: dict[str, Any], keep_last: int) -> Path:
    """Write a complete tag directory, then move `latest`, then prune old tags."""
    root = checkpoint_dir(run_dir)
    final = root / tag_for(step)
    tmp = make_temp_dir(root, prefix=f".tmp-{final.name}-")
    try:
        torch.save(state, tmp / STATE_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        _publish_tag(tmp, final, root, keep_last)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    comm.barrier("checkpoint: temp dir ready")
    write_engine(tmp)
    torch.save(rank_state, tmp / rank_file(comm.rank))
    comm.barrier("checkpoint: every rank written")
    if comm.rank == 0:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        torch.save({**shared_state, "layout": LAYOUT_DEEPSPEED}, tmp / STATE_FILE)
        _publish_tag(tmp, final, root, keep_last)
    comm.barrier("checkpoint: published")
    return final


# ---- reading ----
def load_rank_state(path: Path, rank: int) -> dict[str, Any]:
    """One rank's part of a sharded checkpoint."""
    state_file = Path(path) / rank_file(rank)
    if not state_file.is_file():
        raise CheckpointError(f"no state for rank {rank} at {state_file} (was it written by fewer ranks?)")
    return safe_torch_load(state_file)


def check_engine_files(tag_dir: Path) -> None:
    """Vet every DeepSpeed file of a tag before DeepSpeed (which unpickles unrestricted) reads it."""
    for path in sorted((Path(tag_dir) / "engine").rglob("*.pt")):
        check_pickle_globals(path)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete tag directories (renamed into place, with their state file), oldest first."""
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / STATE_FILE).is_file())


def prune_checkpoints(root: Path, keep_last: int, keep: Path | None = None) -> None:
    """Delete tags beyond the newest ``keep_last``; never ``keep`` (newest verified) nor `latest`'s target."""
    protected = {p for p in (keep, _pointer_target(root)) if p is not None}
    for path in list_checkpoints(root)[:-keep_last]:
        if path not in protected:
            shutil.rmtree(path, ignore_errors=True)
    for stale in [*root.glob(".tmp-*"), *root.glob(".old-*")]:
        shutil.rmtree(stale, ignore_errors=True)


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Temp files and directories a killed run left in its checkpoints directory and beside its own files
    (an interrupted atomic write of ``config.json`` in the run directory); removed, and returned."""
    root = checkpoint_dir(run_dir)
    stale = [*root.glob(".latest.*.tmp"), *root.glob(".tmp-*"), *root.glob(".old-*")]
    # Only files the trainer itself writes atomically in the run directory: ``.NAME.*.tmp`` for its own names.
    stale += [p for name in RUN_DIR_FILES for p in Path(run_dir).glob(f".{name}.*.tmp")]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if stale:
        log.info("removed %d temporary file(s) left in %s by an interrupted run", len(stale), root)
    return stale


def _pointer_target(root: Path) -> Path | None:
    pointer = root / "latest"
    try:
        name = pointer.read_text().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return root / name if name.startswith("step_") and "/" not in name else None


def read_latest(run_dir: Path) -> Path | None:
    """The tag `latest` points at, or None when the run has no pointer."""
    root = checkpoint_dir(run_dir)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = _pointer_target(root)
    if path is None or not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{pointer} points at {path}, which is not a complete checkpoint")
    return path


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """The checkpoint a run continues from, and every newer one that was passed over and why."""

    path: Path
    skipped: tuple[tuple[Path, str], ...] = ()


def find_resume_point(run_dir: Path) -> ResumePoint | None:
    """The newest checkpoint that verifies (None when the run has none); CheckpointError when none verifies.

    `latest` is a hint, not the authority: a kill between a tag's rename and
    the pointer's move leaves a newer complete tag, which is adopted.
    """
    root = checkpoint_dir(run_dir)
    candidates = list_checkpoints(root)[::-1]
    if not candidates:
        return None
    skipped: list[tuple[Path, str]] = []
    for path in candidates:
        try:
            verify_checkpoint(path)
            return ResumePoint(path, tuple(skipped))
        except CheckpointError as err:
            skipped.append((path, str(err)))
    reasons = "; ".join(why for _, why in skipped)
    raise CheckpointError(f"no checkpoint in {root} verifies ({reasons}); start a new run.name or restore one")


def describe_resume(point: ResumePoint, root: Path) -> str:
    """One line: which checkpoint, and why newer ones (or the pointer) were passed over."""
    notes = [f"skipped {p.name}: {why}" for p, why in point.skipped]
    target = _pointer_target(root)
    if target is None:
        notes.append(f"{root / 'latest'} is missing: adopted the newest complete checkpoint")
    elif target != point.path and not point.skipped:
        notes.append(f"`latest` pointed at {target.name}: adopted the newer complete {point.path.name}")
    return f"resuming from {point.path}" + (f" ({'; '.join(notes)})" if notes else "")


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, config dict) of one tag directory, loaded restricted to tensors and plain data."""
    state_file = Path(path) / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"no checkpoint state at {state_file}")
    state = safe_torch_load(state_file)
    if not isinstance(state, dict):
        raise CheckpointError(f"{state_file} does not hold a checkpoint state")
    return state, read_json(Path(path) / CONFIG_FILE)
