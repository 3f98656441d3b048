"""Single-process trainer: load, loop `train_step`, checkpoint, evaluate, export.

The frozen encoder lives beside the trainable model (never inside what an
optimizer or a distributed wrapper sees). Everything resumable is a stateful
object with ``state_dict``/``load_state_dict``: model, optimizer, scheduler,
window sampler, mask RNG and ``TrainState`` (step, counters, loss history,
global RNGs). SIGTERM (preemption) finishes the current step, checkpoints and
returns normally.
"""

from __future__ import annotations

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
from torch import nn

from data_shards.features import resolve_feature_dir
from pretrain.checkpoint import CheckpointError, load_checkpoint, read_latest, save_checkpoint
from pretrain.config import Config, config_to_dict, save_config
from pretrain.data import BatchSource, EncodedVideo, WindowSampler, data_summary, encode_video, split_windows
from pretrain.encoder import FrozenEncoder, load_encoder
from pretrain.export import export_config, spec_dict, write_export
from pretrain.model.predictor import FuturePredictor, count_parameters, spec_from_config
from pretrain.objective import HeldoutResult, evaluate_batches, evaluate_heldout, objective_loss
from pretrain.shard_data import ShardBatchSource, eval_batches, shard_summary
from pretrain.tracking import MetricLogger, build_logger

log = logging.getLogger(__name__)

# Sections that define the model and objective: a checkpoint written under
# different values cannot be resumed by this config.
MODEL_SECTIONS = ("encoder", "core", "predictor", "objective")


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
        return {
            **dataclasses.asdict(self),
            "rng_torch": torch.get_rng_state(),
            "rng_python": random.getstate(),
            "rng_numpy": np.random.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, state[f.name])
        torch.set_rng_state(state["rng_torch"])
        random.setstate(state["rng_python"])
        np.random.set_state(state["rng_numpy"])


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device='cuda' but CUDA is not available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on norms, biases and embeddings-as-vectors."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=tuple(cfg.train.betas))


class _StopFlag:
    """Set by SIGTERM; the loop checkpoints at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _StopFlag:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, nothing to restore
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        log.warning("SIGTERM: checkpointing at the end of this step")
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


class Trainer:
    def __init__(self, cfg: Config, rank: int = 0) -> None:
        self.cfg = cfg
        self.rank = rank
        self.device = pick_device(cfg.run.device)
        seed_everything(cfg.run.seed)
        self.encoder: FrozenEncoder = load_encoder(
            cfg.encoder.source,
            arch=cfg.encoder.arch,
            image_size=cfg.encoder.image_size,
            chunk_frames=cfg.encoder.chunk_frames,
            device=self.device,
            seed=cfg.run.seed,
        )
        self.videos: list[EncodedVideo] = []
        self.heldout_by_offset: dict[int, list] = {}
        if cfg.data.source == "videos":
            cache_dir = Path(cfg.data.feature_cache or Path(cfg.run.out_dir) / "feature_cache")
            self.videos = [encode_video(v, self.encoder, cfg.data, cache_dir) for v in cfg.data.videos]
            train_windows, heldout = split_windows(self.videos, cfg)
            self.heldout_by_offset = {
                o: split_windows(self.videos, cfg, offset=o)[1] for o in cfg.objective.target_offsets
            }
            self.summary = data_summary(self.videos, train_windows, heldout)
            self.sampler: BatchSource = WindowSampler(self.videos, train_windows, cfg, seed=cfg.run.seed)
            grid_hw = (self.encoder.grid, self.encoder.grid)
        else:
            shard_source = ShardBatchSource(cfg, self.encoder, self.device, rank, world_size=1)
            self.summary = shard_summary(cfg, shard_source.loader)
            self.sampler = shard_source
            grid_hw = self._shard_grid()

        self.spec = spec_from_config(cfg, self.encoder.embed_dim, *grid_hw)
        self.model = FuturePredictor(self.spec).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.mask_generator = torch.Generator().manual_seed(cfg.run.seed + 1)
        self.state = TrainState()
        self.batch_plan = cfg.batch_plan(world_size=1)
        self.logger: MetricLogger | None = None
        log.info(
            "model: %d trainable parameters (%s core); data %s; batch %s",
            count_parameters(self.model),
            cfg.core.kind,
            cfg.data.source,
            self.batch_plan,
        )

    def _shard_grid(self) -> tuple[int, int]:
        """Token grid the model sees: the encoder's, the feature shards', or the feature crop."""
        if self.cfg.data.source != "features":
            return (self.encoder.grid, self.encoder.grid)
        _, manifest = resolve_feature_dir(self.cfg.data.shards, self.encoder.weights_hash)
        grid_h, grid_w = manifest["grid"]
        if self.cfg.data.crop_grid:
            return (self.cfg.data.crop_grid, self.cfg.data.crop_grid)
        return (grid_h, grid_w)

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir

    # ---- resumable state ----
    def meta(self) -> dict[str, Any]:
        return {"model_spec": spec_dict(self.spec), "encoder": self.encoder.identity(), "data_summary": self.summary}

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "mask_rng": self.mask_generator.get_state(),
            "trainer": self.state.state_dict(),
            "meta": self.meta(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.mask_generator.set_state(state["mask_rng"])
        self.state.load_state_dict(state["trainer"])

    def save(self) -> Path:
        return save_checkpoint(
            self.run_dir, self.state.step, self.state_dict(), config_to_dict(self.cfg), self.cfg.train.keep_last
        )

    def maybe_resume(self) -> None:
        latest = read_latest(self.run_dir)
        if latest is None:
            return
        state, saved_cfg = load_checkpoint(latest)
        current = config_to_dict(self.cfg)
        changed = [
            f"{section}.{key}"
            for section in MODEL_SECTIONS
            for key in current[section]
            if saved_cfg.get(section, {}).get(key) != current[section][key]
        ]
        if changed:
            raise CheckpointError(
                f"{latest} was written with different {', '.join(changed)}; "
                "resume with the same config or start a new run.name"
            )
        if state["meta"]["encoder"]["weights_hash"] != self.encoder.weights_hash:
            raise CheckpointError(f"{latest} was trained with another encoder ({state['meta']['encoder']['name']})")
        self.load_state_dict(state)
        log.info("resumed from %s at step %d", latest, self.state.step)

    # ---- the loop ----
    def train_step(self) -> dict[str, float]:
        """One optimizer step over grad_accum micro-batches, with clipping and the non-finite guard."""
        cfg = self.cfg
        self.model.train()
        total_loss = torch.zeros((), device=self.device)
        wait = 0.0
        for _ in range(self.batch_plan.grad_accum):
            t0 = time.perf_counter()
            batch = self.sampler.next_batch(self.batch_plan.micro_batch_size).to(self.device)
            wait += time.perf_counter() - t0
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                out = objective_loss(
                    self.model, self.encoder, batch, cfg.objective.visible_fraction, self.mask_generator
                )
            (out.loss / self.batch_plan.grad_accum).backward()
            total_loss += out.loss.detach() / self.batch_plan.grad_accum
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        loss = total_loss.item()
        if not (math.isfinite(loss) and math.isfinite(grad_norm.item())):
            return self._skip_nonfinite(loss)
        self.state.consecutive_nonfinite = 0
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "grad_norm": grad_norm.item(), "data_wait_s": wait}

    def _skip_nonfinite(self, loss: float) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
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
        return {"loss": loss, "grad_norm": float("nan"), "data_wait_s": 0.0}

    def train(self, stop_at: int | None = None, finalize: bool = True) -> TrainResult:
        """Train to train.steps (or stop_at, checkpointing there); then evaluate and export."""
        cfg = self.cfg
        self.maybe_resume()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.run_dir / "config.json")
        self.logger = build_logger(cfg, self.rank, resume_run_id=self.state.mlflow_run_id)
        self.state.mlflow_run_id = getattr(self.logger, "run_id", None)
        end = min(cfg.train.steps, stop_at) if stop_at is not None else cfg.train.steps
        status = "FAILED"
        try:
            with _StopFlag() as stop, _progress(cfg, self.state.step, end) as bar:
                stopped = self._loop(end, stop, bar)
            result = TrainResult(self.state.step, stopped or self.state.step < cfg.train.steps, self.run_dir)
            if finalize and not result.stopped_early:
                self._finalize(result)
            status = "FINISHED" if not result.stopped_early else "KILLED"
            result.tracking = self.logger.where
            return result
        finally:
            self.logger.close(status)

    def _loop(self, end: int, stop: _StopFlag, bar) -> bool:
        cfg = self.cfg
        window_t0, window_steps = time.perf_counter(), 0
        window_wait = 0.0
        while self.state.step < end:
            metrics = self.train_step()
            self.state.step += 1
            self.state.history.append((self.state.step, metrics["loss"]))
            window_steps += 1
            window_wait += metrics["data_wait_s"]
            bar.update(1)
            if self.state.step % cfg.train.log_every == 0 or self.state.step == end:
                elapsed = time.perf_counter() - window_t0
                clips = window_steps * self.batch_plan.global_batch_size
                self.logger.log_metrics(
                    {
                        "loss": metrics["loss"],
                        "lr": self.scheduler.get_last_lr()[0],
                        "grad_norm": metrics["grad_norm"],
                        "clips_per_s": clips / elapsed,
                        "data_wait_share": window_wait / elapsed,
                        "skipped_steps": self.state.skipped_steps,
                        "skipped_samples": self.sampler.skipped_samples,
                    },
                    step=self.state.step,
                )
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", clips_s=f"{clips / elapsed:.1f}")
                window_t0, window_steps, window_wait = time.perf_counter(), 0, 0.0
            at_ckpt = cfg.train.ckpt_every and self.state.step % cfg.train.ckpt_every == 0
            if stop.requested or at_ckpt or self.state.step == end:
                self.save()
            if stop.requested:
                return True
        return False

    def _finalize(self, result: TrainResult) -> None:
        result.heldout = self.evaluate(self.model)
        untrained = FuturePredictor(self.spec).to(self.device)
        result.heldout_untrained = self.evaluate(untrained)
        for r in result.heldout:
            self.logger.log_metrics(
                {f"heldout_l1_offset{r.offset}": r.model_l1, f"copy_last_l1_offset{r.offset}": r.copy_last_l1},
                step=self.state.step,
            )
        export_cfg = export_config(self.meta(), config_to_dict(self.cfg), self.state.step)
        result.export_dir = write_export(self.model.state_dict(), export_cfg, self.run_dir / "export", "fp32")
        plot = write_loss_curve(self.state.history, self.run_dir / "loss_curve.png")
        report = self.run_dir / "heldout.json"
        report.write_text(
            json.dumps(
                {
                    "step": self.state.step,
                    "metric": "masked-token L1 vs layer-normed frozen features, held-out windows",
                    "pretrained": [dataclasses.asdict(r) for r in result.heldout],
                    "untrained": [dataclasses.asdict(r) for r in result.heldout_untrained],
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
        """Held-out prediction error: the last part of each video, or data.eval_shards."""
        cfg = self.cfg
        if cfg.data.source == "videos":
            return evaluate_heldout(model, self.encoder, self.videos, self.heldout_by_offset, cfg)
        if not cfg.data.eval_shards:
            log.info("no data.eval_shards: skipping the held-out evaluation")
            return []
        by_offset = {o: eval_batches(cfg, self.encoder, self.device, o) for o in cfg.objective.target_offsets}
        return evaluate_batches(model, self.encoder, by_offset, cfg.objective.visible_fraction)


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kwargs) -> None:
        pass


def _progress(cfg: Config, start: int, end: int):
    if not cfg.train.progress:
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
