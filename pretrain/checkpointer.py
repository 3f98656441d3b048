"""The Checkpointer: a run's resumable state saved, found, checked and restored (cf. torchtitan's CheckpointManager).

The trainer builds one with its stateful parts (engine, scheduler, batch
source, mask RNG, ``TrainState``), calls ``maybe_resume()`` before its loop
and ``save(step)`` at its cadence; everything about the checkpoint directory
lives here and in ``pretrain.checkpoint`` (the file formats), nothing in the
trainer.

What is saved, per layout (``TrainEngine.sharded``; formats in ``pretrain.checkpoint``):

- single-file (torch engine, one process): ``state.pt`` holds the engine's
  ``state_dict()`` (model, optimizer), every rank-state entry and ``meta``;
- sharded (DeepSpeed, any world size): the engine writes its shards
  (``TrainEngine.save``), every rank writes ``rank_NNNNN.pt`` with its
  rank-state entries, rank 0 writes ``state.pt`` with ``meta``, the step and the
  engine's layout record.

Resume (``train.resume``): 'auto' continues from the newest checkpoint whose
files match their manifest, if any; 'must' refuses to start without one;
'never' refuses a run directory that already holds checkpoints. The
checkpoint must agree with this run on ``MODEL_KEYS`` (and on the encoder's
weights hash); every other config key, runtime knobs included, may change.
Retention (``train.keep_last``) is applied by every save.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from pretrain.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    describe_resume,
    find_resume_point,
    list_checkpoints,
    load_checkpoint,
    load_rank_state,
    remove_stale_temporaries,
    save_checkpoint,
    save_sharded_checkpoint,
)
from pretrain.config import Config, config_to_dict, save_config
from pretrain.distributed import DistContext
from pretrain.export import checkpoint_weights

if TYPE_CHECKING:
    from torch.optim.lr_scheduler import LRScheduler

    from pretrain.parallelize import TrainEngine

log = logging.getLogger(__name__)

MODEL_KEYS = (
    # The frozen encoder as the model sees it: token grid, block widths and heads, the blocks fed to
    # the core. (Its weights are compared by hash: ``meta["encoder"]["weights_hash"]``.)
    "encoder.arch",
    "encoder.image_size",
    "encoder.feature_layers",
    # The trainable model: every parameter shape and every forward the core and predictor compute.
    "core.kind",
    "core.dim",
    "core.depth",
    "core.num_heads",
    "core.mlp_ratio",
    "core.d_state",
    "core.d_conv",
    "core.expand",
    "predictor.depth",
    "predictor.num_heads",
    "predictor.mlp_ratio",
    "predictor.residual",
    # The objective: what is predicted from what, and from how much of the target.
    "objective.source_frames",
    "objective.target_offsets",
    "objective.targets_per_clip",
    "objective.visible_fraction",
    "objective.memory",
    "objective.recall_offsets",
    "objective.change_weight",
)
"""Dotted config keys that define the model and its objective: a checkpoint written under other
values is refused on resume, naming each key with its old and new value."""

ADDED_LATER: dict[str, Any] = {
    "objective.recall_offsets": [],
    "objective.change_weight": 0.0,
}
"""MODEL_KEYS added after checkpoints had been written, each with the value that reproduces what those
checkpoints were trained under: a saved config without the key reads as that value, so a run from
before the key existed resumes unless the new value differs."""

RUNTIME_KEYS = {
    "encoder.source": "where the weights are read from; the weights themselves are compared by hash, "
    "so a moved or re-imported copy of the same weights resumes",
    "encoder.attn_backend": "which attention kernel computes the same attention",
    "encoder.chunk_frames": "frames per encoder call (a memory bound); frames are encoded independently",
    "encoder.compile": "torch.compile of the same encoder forward",
    "encoder.compile_cache_dir": "where compiled kernels are cached",
    "encoder.compile_mode": "how torch.compile optimizes the same forward",
}
"""Keys of the encoder, core, predictor and objective sections left out of MODEL_KEYS, and why:
they change how the same model is computed, not what it is, so changing them resumes."""

_ABSENT = object()


class Stateful(Protocol):
    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any) -> None: ...


class GeneratorState:
    """A ``torch.Generator`` as a stateful object: its state tensor is the whole state."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> torch.Tensor:
        return self.generator.get_state()

    def load_state_dict(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def config_value(config: dict[str, Any], dotted: str) -> Any:
    """The value at ``section.key`` of a config dict (``_ABSENT`` when the checkpoint's config lacks it)."""
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return _ABSENT
        value = value[part]
    return value


SCHEDULE_KEYS = ("train.steps", "train.warmup_steps", "train.lr", "train.min_lr_ratio")
"""Keys a resume may change but that reshape the learning-rate schedule from the resumed step on: allowed,
warned about in one line and recorded (MLflow params ``resumed_at_STEP.KEY``)."""


def key_changes(saved: dict[str, Any], current: dict[str, Any], keys: tuple[str, ...]) -> dict[str, tuple[Any, Any]]:
    """``key -> (old, new)`` for every key on which two config dicts differ (``ADDED_LATER`` fills a
    saved config's gaps)."""
    pairs = {key: (_saved_value(saved, key), config_value(current, key)) for key in keys}
    return {key: pair for key, pair in pairs.items() if pair[0] != pair[1]}


def _saved_value(saved: dict[str, Any], key: str) -> Any:
    value = config_value(saved, key)
    return ADDED_LATER.get(key, value) if value is _ABSENT else value


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else repr(value)


def model_key_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every MODEL_KEYS entry on which two config dicts differ."""
    return [
        f"{key}: {_show(old)} -> {_show(new)}" for key, (old, new) in key_changes(saved, current, MODEL_KEYS).items()
    ]


class Checkpointer:
    """Saves and restores one run's resumable state; the trainer never touches checkpoint files itself.

    ``rank_state`` maps names to stateful objects restored per rank (scheduler, batch source, mask
    RNG, ``TrainState``); their order is the order of the saved dict. ``meta`` (model spec, encoder
    identity, data summary) is written into every checkpoint and read back by export.
    """

    def __init__(
        self,
        cfg: Config,
        ctx: DistContext,
        engine: TrainEngine,
        *,
        scheduler: LRScheduler,
        rank_state: dict[str, Stateful],
        meta: dict[str, Any],
    ) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.engine = engine
        self.scheduler = scheduler
        self.rank_state = rank_state
        self.meta = meta
        self.config = config_to_dict(cfg)
        self.schedule_changes: dict[str, tuple[Any, Any]] = {}
        """SCHEDULE_KEYS the resumed checkpoint was written with other values of: key -> (old, new)."""
        self.resumed_from: Path | None = None
        """The checkpoint ``maybe_resume`` continued from (None: a fresh start)."""
        self.last: Path | None = None
        """The newest checkpoint this run has saved or resumed from."""

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir

    def save(self, step: int) -> Path:
        """Collective: write the checkpoint of ``step``, publish it, prune past ``train.keep_last``."""
        if self.ctx.is_main:
            save_config(self.cfg, self.run_dir / "config.json")
        rank_state = {name: obj.state_dict() for name, obj in self.rank_state.items()}
        if self.engine.sharded:
            self.last = save_sharded_checkpoint(
                self.run_dir,
                step,
                comm=self.ctx,
                write_engine=self.engine.save,
                rank_state=rank_state,
                shared_state={"meta": self.meta, "trainer": {"step": step}, **self.engine.state_dict()},
                config=self.config,
                keep_last=self.cfg.train.keep_last,
            )
        else:
            state = {**self.engine.state_dict(), **rank_state, "meta": self.meta}
            self.last = save_checkpoint(self.run_dir, step, state, self.config, self.cfg.train.keep_last)
        return self.last

    def maybe_resume(self) -> Path | None:
        """Continue from the newest checkpoint that verifies; ``train.resume`` says what having none means."""
        root = checkpoint_dir(self.run_dir)
        if self.ctx.is_main:
            remove_stale_temporaries(self.run_dir)
        if self.cfg.train.resume == "never":
            if list_checkpoints(root):
                raise CheckpointError(
                    f"{self.run_dir} already holds checkpoints and train.resume='never'; "
                    "choose a new run.name, or train.resume=auto to continue that run"
                )
            return None
        point = find_resume_point(self.run_dir)
        if point is None:
            if self.cfg.train.resume == "must":
                raise CheckpointError(f"train.resume='must' but {root} holds no checkpoint")
            return None
        (log.warning if point.skipped else log.info)(describe_resume(point, root))
        state, saved_config = load_checkpoint(point.path)
        self.check_compatible(point.path, state, saved_config)
        self._restore(point.path, state)
        self._note_schedule_changes(saved_config, state["trainer"]["step"])
        self.resumed_from = self.last = point.path
        log.info("resumed from %s at step %d", point.path, state["trainer"]["step"])
        return point.path

    def check_compatible(self, path: Path, state: dict[str, Any], saved_config: dict[str, Any]) -> None:
        """Refuse a checkpoint of another model, objective or encoder (CheckpointError naming what differs)."""
        changes = model_key_changes(saved_config, self.config)
        if changes:
            raise CheckpointError(
                f"{path} was written with a different model or objective ({'; '.join(changes)}); "
                "resume with the same values or start a new run.name"
            )
        if state["meta"]["encoder"]["weights_hash"] != self.meta["encoder"]["weights_hash"]:
            raise CheckpointError(f"{path} was trained with another encoder ({state['meta']['encoder']['name']})")

    def _note_schedule_changes(self, saved_config: dict[str, Any], step: int) -> None:
        """Warn in one line when the schedule changes under a resumed run (a longer train.steps moves the lr)."""
        self.schedule_changes = key_changes(saved_config, self.config, SCHEDULE_KEYS)
        if not self.schedule_changes:
            return
        scheduler = self.scheduler
        old_lr = scheduler.get_last_lr()[0]
        # LambdaLR keeps this run's schedule function (a plain function is not part of its state).
        new_lr = scheduler.base_lrs[0] * scheduler.lr_lambdas[0](step)
        changed = ", ".join(f"{key} {_show(old)} -> {_show(new)}" for key, (old, new) in self.schedule_changes.items())
        log.warning(
            "resuming at step %d with %s: the learning-rate schedule is recomputed from here (lr %.3g -> %.3g)",
            step,
            changed,
            old_lr,
            new_lr,
        )

    def _restore(self, path: Path, state: dict[str, Any]) -> None:
        try:
            self.engine.load_state_dict(state)
        except CheckpointError as err:
            raise CheckpointError(f"{path} {err}") from err
        self.engine.load(path)
        rank_state = load_rank_state(path, self.ctx.rank) if self.engine.sharded else state
        for name, obj in self.rank_state.items():
            obj.load_state_dict(rank_state[name])
        # The schedule is ours, not the engine's: put its learning rate back into the param groups
        # (DeepSpeed's load leaves its own there; a torch optimizer's state already agrees).
        for group, lr in zip(self.engine.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
            group["lr"] = lr

    def saved_weights(self) -> dict[str, torch.Tensor]:
        """Full fp32 weights of the trainable model in the newest checkpoint saved or resumed: what an export holds.

        No collective: a sharded checkpoint is consolidated from its files, the path ``pretrain.export``
        takes (under DeepSpeed these are the fp32 masters, not the engine's possibly-bf16 module).
        """
        if self.last is None:
            raise CheckpointError(f"{self.run_dir}: no checkpoint was saved or resumed")
        state, _ = load_checkpoint(self.last)
        return checkpoint_weights(self.last, state)
