"""Train a task readout on the shared features, then score it on the held-out videos.

Shape legend: V videos, T frames, N patch tokens, D encoder width, d feature width.

A feature path with nothing to train (frozen probe of the pretrained or
random core) is run once over every video and its features are shared by
all tasks (``FeatureCache``); otherwise (finetuning) the path runs inside
the training step. Either way the readout
sees the same features for the same video: one ``FeaturePath.forward``.
Everything random (readout init, batch order) follows the seed, so two runs
with the same seed give the same numbers on CPU.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from eval.features import FeaturePath
from eval.tasks import Batch, Task

log = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class ReadoutConfig:
    """How every readout is trained; the same budget for every variant."""

    steps: int = 150
    """Optimizer steps."""
    batch_size: int = 8
    """Videos per step."""
    lr: float = 2e-3
    """AdamW learning rate of the readout."""
    finetune_lr: float = 1e-4
    """Learning rate of the feature path (adapter and core) in finetune mode; the same for every variant."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    eval_batch_size: int = 8
    """Videos per forward pass when precomputing features and scoring."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "finetune_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


@torch.no_grad()
def precompute_features(path: FeaturePath, tokens_VTND: Tensor, batch_size: int) -> Tensor:
    """Features of every video through a frozen path, (V, T, N, d) float32."""
    path.eval()
    return torch.cat([path(chunk.float()) for chunk in tokens_VTND.split(batch_size)])


class FeatureCache:
    """Features of frozen paths, keyed by the caller (variant, protocol), computed once."""

    def __init__(self) -> None:
        self._features: dict[tuple[str, ...], Tensor] = {}

    def get(self, key: tuple[str, ...], path: FeaturePath, tokens_VTND: Tensor, batch_size: int) -> Tensor:
        if key not in self._features:
            start = time.perf_counter()
            self._features[key] = precompute_features(path, tokens_VTND, batch_size)
            log.info("features %s for %d videos in %.1f s", key, len(tokens_VTND), time.perf_counter() - start)
        return self._features[key]


def _index(batch: Batch, idx: Tensor) -> Batch:
    return {k: v[idx] for k, v in batch.items()}


def _cat(parts: list[Batch]) -> Batch:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@dataclass(slots=True)
class ProbeResult:
    metrics: dict[str, float]
    final_loss: float
    train_seconds: float
    trainable_parameters: dict[str, int]
    test_outputs: Batch
    """The readout's outputs on the test videos, in test_idx order (for per-clip statistics)."""
    test_targets: Batch
    """The targets of the test videos, in the same order."""


def train_and_evaluate(
    task: Task,
    path: FeaturePath,
    tokens_VTND: Tensor,
    targets: Batch,
    train_idx: Tensor,
    test_idx: Tensor,
    grid: int,
    cfg: ReadoutConfig,
    seed: int,
    features_VTNd: Tensor | None = None,
    streaming: bool | None = None,
) -> ProbeResult:
    """Train the task's readout on train_idx videos and score it on test_idx.

    ``features_VTNd``: precomputed features of a frozen path (required to be
    None when the path has trainable parameters). ``streaming``: build the
    task's streaming (True) or all-frames (False) readout; None follows the
    path's protocol.
    """
    if features_VTNd is not None and path.trainable:
        raise ValueError("precomputed features were passed for a path that trains")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    frames, dim = tokens_VTND.shape[1], path.core.dim
    if streaming is None:
        streaming = path.protocol == "streaming"
    readout = task.build_readout(dim, grid, frames, streaming=streaming)
    groups: list[dict[str, Any]] = [{"params": list(readout.parameters()), "lr": cfg.lr}]
    path_params = [p for p in path.parameters() if p.requires_grad]
    if path_params:
        # One learning rate for every variant's feature path, so a comparison is not one of step sizes.
        groups.append({"params": path_params, "lr": cfg.finetune_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)

    def features(idx: Tensor) -> Tensor:
        if features_VTNd is not None:
            return features_VTNd[idx]
        return path(tokens_VTND[idx].float())

    start = time.perf_counter()
    readout.train()
    path.train(path.trainable)
    loss = torch.zeros(())
    for step in range(cfg.steps):
        pick = torch.randint(len(train_idx), (min(cfg.batch_size, len(train_idx)),), generator=generator)
        idx = train_idx[pick]
        batch = _index(targets, idx)
        loss = task.loss(task.outputs(readout, features(idx), batch), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            log.debug("%s step %d loss %.4f", task.name, step, loss.item())
    train_seconds = time.perf_counter() - start

    readout.eval()
    path.eval()
    outputs, batches = [], []
    with torch.no_grad():
        for idx in test_idx.split(cfg.eval_batch_size):
            batch = _index(targets, idx)
            outputs.append({k: v.float() for k, v in task.outputs(readout, features(idx), batch).items()})
            batches.append(batch)
    test_outputs, test_targets = _cat(outputs), _cat(batches)
    metrics = task.metrics(test_outputs, test_targets)
    trainable = {
        "readout": sum(p.numel() for p in readout.parameters()),
        "feature_path": sum(p.numel() for p in path_params),
    }
    return ProbeResult(metrics, float(loss.item()), train_seconds, trainable, test_outputs, test_targets)
