"""Trainer: load, loop `train_step`, checkpoint, evaluate, export; one process or many.

The frozen encoder lives beside the trainable model (never inside what an
optimizer or a distributed wrapper sees). The trainable model is wrapped by
``pretrain.parallelize.build_engine``: the plain torch engine for a lone
process, a DeepSpeed engine under a launcher (``pretrain.distributed``); the
trainer only uses the ``TrainEngine`` interface, never asks which.
A batch travels one path whatever data.source says (``pretrain.data`` builds shards from
data.videos first): batch source (``ShardBatchSource.next_batch``: frames or stored tokens, as
read) -> frozen-feature stage (``pretrain.features.frozen_features``, the one place the ViT runs,
under no_grad) -> model and loss (``pretrain.objective.objective_loss``) -> engine backward/step.
Everything resumable is a stateful object with ``state_dict``/``load_state_dict``:
engine (model, optimizer), scheduler, batch source, mask RNG and ``TrainState``
(step, counters, loss history, global RNGs), the last four per rank; the
``Checkpointer`` (``pretrain.checkpointer``) saves, finds and restores them.
SIGTERM (preemption) finishes the current step, checkpoints and returns
normally; all ranks agree on the stop through the per-step metric all-reduce,
so they stop at the same step. Every ``train.eval_every`` steps rank 0 runs the
final held-out evaluation on the current weights and logs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain import distributed
from pretrain.checkpoint import checkpoint_dir, list_checkpoints
from pretrain.checkpointer import Checkpointer, GeneratorState
from pretrain.config import Config, ConfigError, config_to_dict
from pretrain.data import (
    BatchSource,
    ShardBatchSource,
    check_feature_shards,
    eval_batches,
    shard_plan,
    shard_summary,
    token_grid,
)
from pretrain.distributed import DistContext
from pretrain.encoder import FrozenEncoder, check_feature_layers, load_encoder
from pretrain.export import export_config, init_from_export, spec_dict, write_export
from pretrain.features import FeatureSettings, frozen_features
from pretrain.model.predictor import FuturePredictor, count_parameters, spec_from_config
from pretrain.objective import HeldoutResult, evaluate_batches, objective_loss
from pretrain.parallelize import TrainEngine, build_engine
from pretrain.tracking import MetricLogger, build_logger

log = logging.getLogger(__name__)

# Rank r draws data and masks from seed + r * RANK_SEED_STRIDE: rank 0 keeps the
# single-process streams, other ranks get distinct ones.
RANK_SEED_STRIDE = 1_000_003


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class TrainState:
    step: int = 0
    consecutive_nonfinite: int = 0
    skipped_steps: int = 0
    history: list[tuple[int, float]] = field(default_factory=list)
    mlflow_run_id: str | None = None

    def state_dict(self) -> dict[str, Any]:
        # Tensors and plain data only, so a checkpoint loads with torch.load(weights_only=True).
        return {
            **dataclasses.asdict(self),
            "rng_torch": torch.get_rng_state(),
            "rng_python": random.getstate(),
            "rng_numpy": _numpy_rng_to_plain(np.random.get_state()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, state[f.name])
        torch.set_rng_state(state["rng_torch"])
        random.setstate(state["rng_python"])
        np.random.set_state(_numpy_rng_from_plain(state["rng_numpy"]))


def _numpy_rng_to_plain(state: tuple) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached_gaussian = state
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _numpy_rng_from_plain(state: dict[str, Any] | tuple) -> tuple:
    if isinstance(state, tuple):  # checkpoints written before RNG state became plain data
        return state
    keys = state["keys"].numpy().astype(np.uint32)
    return (state["name"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(cfg: Config):
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    train = cfg.train

    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        span = max(1, train.steps - train.warmup_steps)
        progress = min(1.0, (step - train.warmup_steps) / span)
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class StopFlag:
    """Set by SIGTERM. The loop checkpoints at the next step boundary; start-up stops before the first
    step; the final evaluation and export, already under way, are finished. Every case exits normally.

    ``pretrain.train`` installs it before start-up (encoder loading and building the shards of
    data.videos can take minutes); a Trainer used from Python installs its own for ``train()``.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopFlag:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, nothing to restore
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        log.warning("SIGTERM: stopping at the next safe point (a checkpoint is written if training has begun)")
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@dataclass
class TrainResult:
    step: int
    stopped_early: bool
    run_dir: Path
    export_dir: Path | None = None
    heldout: list[HeldoutResult] = field(default_factory=list)
    heldout_untrained: list[HeldoutResult] = field(default_factory=list)
    tracking: str = ""
    identity: TrainResult | None = None
    """The identity-core control run (train.identity_control), trained the same way."""


class Trainer:
    def __init__(self, cfg: Config, ctx: DistContext | None = None, stop: StopFlag | None = None) -> None:
        self.cfg = cfg
        self._outer_stop = stop
        self.ctx = ctx if ctx is not None else distributed.setup(cfg)
        self.rank = self.ctx.rank
        self.device = self.ctx.device
        rank_seed = cfg.run.seed + RANK_SEED_STRIDE * self.rank
        seed_everything(cfg.run.seed)
        self.encoder: FrozenEncoder = load_encoder(
            cfg.encoder.source,
            arch=cfg.encoder.arch or None,
            image_size=cfg.encoder.image_size,
            chunk_frames=cfg.encoder.chunk_frames,
            device=self.device,
            seed=cfg.run.seed,
            attn_backend=cfg.encoder.attn_backend,
            compile=cfg.encoder.compile,
            compile_cache_dir=cfg.encoder.compile_cache_dir,
            compile_mode=cfg.encoder.compile_mode,
        )
        try:
            check_feature_layers(cfg.encoder.feature_layers, self.encoder.arch.depth)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        # data.source='videos' is a front end: it builds shards (once, cached) and the run trains from them.
        self.shards = shard_plan(cfg, self.encoder, self.ctx)
        data_cfg = self.shards.cfg
        # Needs the shards' manifest, so it is checked here rather than in Config.
        check_feature_shards(data_cfg, self.encoder.weights_hash)
        source = ShardBatchSource(data_cfg, self.rank, self.ctx.world_size, self.encoder.weights_hash)
        self.sampler: BatchSource = source
        self.summary = {**shard_summary(data_cfg, source.loader, cfg.data.source), **self.shards.summary}
        self.features = FeatureSettings.from_config(cfg)

        self.spec = spec_from_config(cfg, self.encoder.embed_dim, *token_grid(data_cfg, self.encoder))
        self.batch_plan = cfg.batch_plan(world_size=self.ctx.world_size)
        model = FuturePredictor(self.spec)
        if cfg.train.init_from and list_checkpoints(checkpoint_dir(self.run_dir)):
            # The checkpoint supersedes the export, which may have moved since the run began.
            log.info("train.init_from is not read: %s holds checkpoints to resume from", self.run_dir)
        elif cfg.train.init_from:
            # Before the engine: DeepSpeed's fp32 masters and ZeRO shards are built from these weights.
            init_from_export(model, Path(cfg.train.init_from), self.encoder.weights_hash)
        self.engine: TrainEngine = build_engine(model, cfg, self.batch_plan, self.ctx, self.run_dir)
        self.model: FuturePredictor = self.engine.module
        self.optimizer = self.engine.optimizer
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.mask_generator = torch.Generator().manual_seed(rank_seed + 1)
        self.state = TrainState()
        self.meta = {
            "model_spec": spec_dict(self.spec),
            "encoder": self.encoder.identity(),
            "data_summary": self.summary,
        }
        self.checkpointer = Checkpointer(
            cfg,
            self.ctx,
            self.engine,
            scheduler=self.scheduler,
            rank_state={
                "scheduler": self.scheduler,
                "sampler": self.sampler,
                "mask_rng": GeneratorState(self.mask_generator),
                "trainer": self.state,
            },
            meta=self.meta,
        )
        self.logger: MetricLogger | None = None
        self._stop = stop if stop is not None else StopFlag()
        log.info(
            "model: %d trainable parameters (%s core); data %s; %s engine; batch: micro %d x accum %d x ranks %d = %d",
            count_parameters(self.model),
            cfg.core.kind,
            cfg.data.source,
            "DeepSpeed" if self.ctx.use_deepspeed else "torch",
            self.batch_plan.micro_batch_size,
            self.batch_plan.grad_accum,
            self.batch_plan.world_size,
            self.batch_plan.global_batch_size,
        )

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir

    # ---- the loop ----
    def train(self, stop_at: int | None = None, finalize: bool = True) -> TrainResult:
        """Resume, train to train.steps (or stop_at, checkpointing there); then evaluate and export.

        A SIGTERM stops at the next step boundary with a checkpoint, and returns normally (``stopped_early``).
        """
        end = min(self.cfg.train.steps, stop_at) if stop_at is not None else self.cfg.train.steps
        with self._stop_context() as self._stop:
            self.checkpointer.maybe_resume()
            self.logger = self._start_logger()
            if self.checkpointer.schedule_changes and self.ctx.is_main:
                # MLflow params cannot change; the new values are recorded under the step they took effect.
                changes = self.checkpointer.schedule_changes
                at = f"resumed_at_{self.state.step}"
                self.logger.log_params({f"{at}.{key}": new for key, (_, new) in changes.items()})
            status = "FAILED"
            try:
                if self._stop_requested_by_any_rank():
                    log.warning(
                        "SIGTERM during start-up: stopped before step %d; nothing new to save", self.state.step + 1
                    )
                    result = TrainResult(self.state.step, True, self.run_dir)
                else:
                    with _progress(self.cfg, self.state.step, end, self.ctx.is_main) as bar:
                        stopped = self._loop(end, bar)
                    result = TrainResult(
                        self.state.step, stopped or self.state.step < self.cfg.train.steps, self.run_dir
                    )
                    if finalize and not result.stopped_early:
                        self._finish(result)
                status = "KILLED" if result.stopped_early else "FINISHED"
                result.tracking = self.logger.where
                return result
            finally:
                self.logger.close(status)

    def _stop_context(self) -> contextlib.AbstractContextManager[StopFlag]:
        """The caller's StopFlag when it installed one (``pretrain.train``), else one for this ``train()``."""
        return contextlib.nullcontext(self._outer_stop) if self._outer_stop is not None else StopFlag()

    def _start_logger(self) -> MetricLogger:
        """The metric logger, continuing a resumed run's MLflow run; its id goes into the next checkpoint."""
        logger = build_logger(
            self.cfg,
            self.rank,
            resume_run_id=self.state.mlflow_run_id,
            resume_step=self.state.step,
            run_dir=self.run_dir,
        )
        self.state.mlflow_run_id = logger.run_id
        return logger

    def _loop(self, end: int, bar) -> bool:
        """Steps to ``end``: log, checkpoint, evaluate at their cadences. True when stopped by a SIGTERM."""
        train = self.cfg.train
        window = _Window()
        while self.state.step < end:
            metrics = self.train_step()
            self.state.step += 1
            self.state.history.append((self.state.step, metrics["loss"]))
            window.add(metrics["data_wait_s"], metrics["encode_s"])
            bar.update(1)
            if self.state.step % train.log_every == 0 or self.state.step == end:
                self._log_step(metrics, window, bar)
                window = _Window()
            # Ranks act on the all-reduced flag only, so they all stop (and checkpoint) at the same step.
            stop = metrics["stop"] > 0
            if stop or _due(self.state.step, train.ckpt_every) or self.state.step == end:
                self.checkpointer.save(self.state.step)
            if stop:
                return True
            # The last step's evaluation is the final one (on the exported weights).
            if _due(self.state.step, train.eval_every) and self.state.step < train.steps:
                self.evaluate_and_log()
        return False

    def train_step(self) -> dict[str, float]:
        """One optimizer step over grad_accum micro-batches, with clipping and the non-finite guard.

        A micro-batch is the batch source's next batch (``data_wait_s``: waiting for data, nothing
        else), the frozen-feature stage (``encode_s``: the ViT, on clip batches), then the loss and
        its backward. Returns rank-aggregated metrics: mean loss, mean data wait and encode time (s),
        and ``stop`` (1.0 when any rank was asked to stop; every rank sees the same).
        """
        plan = self.batch_plan
        self.model.train()
        total_loss = torch.zeros((), device=self.device)
        wait = 0.0
        encode_clock = _StageClock(self.device)
        for _ in range(plan.grad_accum):
            t0 = time.perf_counter()
            batch = self.sampler.next_batch(plan.micro_batch_size).to(self.device)
            wait += time.perf_counter() - t0
            with torch.no_grad(), encode_clock:
                features = frozen_features(self.encoder, batch, self.features, self.mask_generator)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                out = objective_loss(self.engine, features, self.cfg.objective.change_weight)
            self.engine.backward(out.loss)
            total_loss += out.loss.detach() / plan.grad_accum
        # Reading the loss synchronizes the device, so the encode clock can be read after it.
        loss_local = total_loss.item()
        local_V = torch.tensor(
            [loss_local, wait, encode_clock.seconds(), float(self._stop.requested)], dtype=torch.float64
        )
        summed_V = self.ctx.all_reduce_sum(local_V, "step metrics")
        loss, mean_wait, mean_encode = (summed_V[:3] / self.ctx.world_size).tolist()
        timing = {"data_wait_s": mean_wait, "encode_s": mean_encode, "stop": float(summed_V[3].item() > 0)}
        outcome = self.engine.step(skip=not math.isfinite(loss))
        if not outcome.applied:
            self._skip_nonfinite(loss)
            return {"loss": loss, "grad_norm": float("nan"), **timing}
        self.state.consecutive_nonfinite = 0
        self.scheduler.step()
        return {"loss": loss, "grad_norm": outcome.grad_norm, **timing}

    def _skip_nonfinite(self, loss: float) -> None:
        self.state.skipped_steps += 1
        self.state.consecutive_nonfinite += 1
        log.warning("non-finite loss/gradient at step %d (loss=%s): step skipped", self.state.step, loss)
        if self.state.consecutive_nonfinite >= self.cfg.train.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self.state.consecutive_nonfinite} consecutive non-finite steps "
                f"(train.max_nonfinite_steps={self.cfg.train.max_nonfinite_steps}); aborting"
            )
        # The scheduler still advances so a skipped step does not shift the schedule
        # (torch warns about stepping it without an optimizer step; that is intended).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()

    def _log_step(self, metrics: dict[str, float], window: _Window, bar) -> None:
        elapsed = time.perf_counter() - window.t0
        clips = window.steps * self.batch_plan.global_batch_size
        self.logger.log_metrics(
            {
                "loss": metrics["loss"],
                "lr": self.scheduler.get_last_lr()[0],
                "grad_norm": metrics["grad_norm"],
                "clips_per_s": clips / elapsed,
                "data_wait_share": window.wait_s / elapsed,
                "encode_s": window.encode_s / window.steps,
                "encode_share": window.encode_s / elapsed,
                "skipped_steps": self.state.skipped_steps,
                "skipped_samples": self.sampler.skipped_samples,
                **self._memory_metrics(),
            },
            step=self.state.step,
        )
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", clips_s=f"{clips / elapsed:.1f}")

    def _memory_metrics(self) -> dict[str, float]:
        if self.device.type != "cuda":
            return {}
        return {"gpu_mem_peak_gib": torch.cuda.max_memory_allocated(self.device) / 2**30}

    def _stop_requested_by_any_rank(self) -> bool:
        """All ranks agree whether a SIGTERM arrived during start-up, so they all stop or all train."""
        flag_V = torch.tensor([float(self._stop.requested)], dtype=torch.float64)
        return bool(self.ctx.all_reduce_sum(flag_V, "start-up stop flag")[0].item() > 0)

    # ---- after the loop ----
    def _finish(self, result: TrainResult) -> None:
        """The identity-core control (when asked for), then rank 0 evaluates and exports."""
        if self._wants_identity_control():
            result.identity = self._train_identity_control()
            result.stopped_early = result.identity.stopped_early
            if result.stopped_early:
                return
        # A SIGTERM from here on is noted, not obeyed: the last checkpoint is written and
        # evaluation and export are bounded, so finishing them loses nothing.
        self._finalize(result)
        # The other ranks wait here while rank 0 evaluates and exports, so that every
        # rank leaves the process group together: a rank tearing its group down while a
        # peer still holds it open was seen to abort (gloo: "terminate called without
        # an active exception"). Bounded by distributed.timeout_s.
        self.ctx.barrier("run finished (rank 0 evaluated and exported)")

    def _wants_identity_control(self) -> bool:
        return self.cfg.train.identity_control and self.cfg.core.kind != "identity"

    def _train_identity_control(self) -> TrainResult:
        """The same data, objective, steps and seed with no temporal core, as its own run (NAME-identity)."""
        cfg = dataclasses.replace(
            self.cfg,
            run=dataclasses.replace(self.cfg.run, name=f"{self.cfg.run.name}-identity"),
            core=dataclasses.replace(self.cfg.core, kind="identity"),
            train=dataclasses.replace(self.cfg.train, identity_control=False),
        )
        log.info("identity-core control: training %s the same way", cfg.run_dir)
        return Trainer(cfg, self.ctx, stop=self._stop).train()

    def _finalize(self, result: TrainResult) -> None:
        # Rank 0 evaluates and exports; the others are done once the final checkpoint is written.
        if not self.ctx.is_main:
            return
        # Evaluate exactly what is exported: the final checkpoint's fp32 weights.
        weights = self.checkpointer.saved_weights()
        result.heldout = self.evaluate(self._predictor(weights))
        untrained = FuturePredictor(self.spec).to(self.device)
        result.heldout_untrained = self.evaluate(untrained)
        self._log_heldout(result.heldout)
        export_cfg = export_config(self.meta, config_to_dict(self.cfg), self.state.step)
        export_cfg["heldout"] = [dataclasses.asdict(r) for r in result.heldout]
        if result.identity is not None:
            export_cfg["identity_control"] = {
                "export": str(result.identity.export_dir),
                "heldout": [dataclasses.asdict(r) for r in result.identity.heldout],
            }
        if self.logger.run_id is not None:
            export_cfg["tracking"] = {
                "uri": self.logger.uri,
                "experiment": self.cfg.tracking.experiment,
                "run_id": self.logger.run_id,
            }
        result.export_dir = write_export(weights, export_cfg, self.run_dir / "export", "fp32")
        plot = write_loss_curve(self.state.history, self.run_dir / "loss_curve.png")
        report = self.run_dir / "heldout.json"
        report.write_text(
            json.dumps(
                {
                    "step": self.state.step,
                    "metric": "masked-token L1 vs layer-normed frozen features, held-out windows",
                    "pretrained": [dataclasses.asdict(r) for r in result.heldout],
                    "untrained": [dataclasses.asdict(r) for r in result.heldout_untrained],
                    "identity_control": (
                        [dataclasses.asdict(r) for r in result.identity.heldout] if result.identity else None
                    ),
                },
                indent=2,
            )
            + "\n"
        )
        self.logger.log_artifact(report)
        self.logger.log_artifact(self.run_dir / "config.json")
        self.logger.log_artifact(result.export_dir, artifact_path="export")
        if plot is not None:
            self.logger.log_artifact(plot)

    def evaluate(self, model: FuturePredictor) -> list[HeldoutResult]:
        """Held-out prediction error on data.eval_shards (data.source='videos': the videos' held-out clips).

        One result per future offset, then one per objective.recall_offsets k as offset -k (the source
        frame k before the last, predicted from the core's last state), each against copy-last.
        """
        data_cfg = self.shards.cfg
        if not data_cfg.data.eval_shards:
            log.info("no held-out shards (data.eval_shards): skipping the held-out evaluation")
            return []
        hash_ = self.encoder.weights_hash
        objective = data_cfg.objective
        offsets = [*objective.target_offsets, *(-k for k in sorted(objective.recall_offsets))]
        by_offset = {o: eval_batches(data_cfg, hash_, o) for o in offsets}
        return evaluate_batches(model, self.encoder, by_offset, self.features)

    def evaluate_and_log(self) -> list[HeldoutResult]:
        """train.eval_every: the final evaluation on the current weights, by rank 0, logged at this step.

        The weights are the ones the training forward uses, in fp32 (under DeepSpeed with bf16, the
        bf16 copy rather than the masters, which only a checkpoint gathers). Training is unaffected:
        the evaluation leaves the global RNGs as it found them. The other ranks wait at a barrier.
        """
        results: list[HeldoutResult] = []
        if self.ctx.is_main:
            with self._rng_untouched():
                results = self.evaluate(self._predictor(self.model.state_dict()))
            self._log_heldout(results)
        self.ctx.barrier(f"held-out evaluation at step {self.state.step}")
        return results

    def _log_heldout(self, results: list[HeldoutResult]) -> None:
        for r in results:
            gain = r.gain if r.copy_last_l1 else float("nan")
            # offset1 for the future frame 1 ahead, recall2 for the source frame 2 before the last.
            suffix = f"offset{r.offset}" if r.offset > 0 else f"recall{-r.offset}"
            self.logger.log_metrics(
                {
                    f"heldout_l1_{suffix}": r.model_l1,
                    f"copy_last_l1_{suffix}": r.copy_last_l1,
                    f"gain_vs_copy_last_{suffix}": gain,
                },
                step=self.state.step,
            )

    def _predictor(self, weights: dict[str, torch.Tensor]) -> FuturePredictor:
        """A fresh fp32 FuturePredictor holding ``weights`` on this rank's device (the global RNG untouched)."""
        with self._rng_untouched():
            model = FuturePredictor(self.spec)
        model.load_state_dict(weights)
        return model.to(self.device)

    def _rng_untouched(self) -> contextlib.AbstractContextManager:
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])


def _due(step: int, every: int) -> bool:
    """A cadence of ``every`` steps (0 = never) is due at ``step``."""
    return every > 0 and step % every == 0


@dataclass
class _Window:
    """Steps, data wait and encode time (s) and start time since the last metric log: throughput over that window."""

    t0: float = field(default_factory=time.perf_counter)
    steps: int = 0
    wait_s: float = 0.0
    encode_s: float = 0.0

    def add(self, wait_s: float, encode_s: float) -> None:
        self.steps += 1
        self.wait_s += wait_s
        self.encode_s += encode_s


class _StageClock:
    """Seconds spent inside ``with clock:`` over a step.

    On CUDA the regions are timed by events and read after the step has synchronized the device, so the
    loop never waits for the clock; elsewhere by the host clock.
    """

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._host_s = 0.0
        self._t0 = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def __enter__(self) -> _StageClock:
        if self._cuda:
            self._events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self._events[-1][0].record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self._cuda:
            self._events[-1][1].record()
        else:
            self._host_s += time.perf_counter() - self._t0

    def seconds(self) -> float:
        """Total seconds; on CUDA, call it once the device has run past the last region."""
        if self._cuda:
            return sum(start.elapsed_time(end) for start, end in self._events) / 1000.0
        return self._host_s


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kwargs) -> None:
        pass


def _progress(cfg: Config, start: int, end: int, is_main: bool = True):
    if not cfg.train.progress or not is_main:
        return _NoBar()
    from tqdm import tqdm

    # Redirected output (CI, SLURM logs) gets an update every 30 s, not a line per step.
    interval = 0.1 if sys.stderr.isatty() else 30.0
    return tqdm(total=end, initial=start, desc="train", unit="step", dynamic_ncols=True, mininterval=interval)


def write_loss_curve(history: list[tuple[int, float]], path: Path) -> Path | None:
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = zip(*history, strict=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, lw=0.8, alpha=0.35, label="per step")
    # Per-step losses mix target offsets of very different difficulty; a running mean shows the trend.
    smoothed, ema = [], losses[0]
    for loss in losses:
        ema = 0.95 * ema + 0.05 * loss if math.isfinite(loss) else ema
        smoothed.append(ema)
    ax.plot(steps, smoothed, lw=1.6, label="running mean")
    ax.legend(loc="upper right")
    ax.set_xlabel("step")
    ax.set_ylabel("masked L1 (train)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
