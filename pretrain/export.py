"""Export: trainable weights (safetensors) + config.json, the only thing eval reads.

    python -m pretrain.export RUN_DIR OUT_DIR [--dtype fp32|bf16]

config.json has one schema, ``ExportConfig``, read by one typed loader,
``read_export_config`` (``open_export`` also rebuilds the model; eval reads
exports through them, never the trainer). Format versions:

- ``video-pretrain-export/2`` (written now): "model_spec" nests the core and
  predictor settings (``ModelSpec.core``, ``ModelSpec.predictor``: the same
  dataclasses as the config's [core] and [predictor] sections); the resolved
  training config is "config" (its objective is no longer copied to a
  top-level "objective").
- ``video-pretrain-export/1``: still read. Its "model_spec" was flat
  (core_kind, dim, core_depth, core_heads, core_mlp_ratio, d_state, d_conv,
  expand, predictor_depth, predictor_heads, predictor_mlp_ratio, residual);
  ``spec_from_record`` lifts it into the nested form.

Eval checks ``ExportConfig.encoder.weights_hash`` against the encoder it loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from data_shards.io import OutputDirError, output_dir
from pretrain.checkpoint import (
    LAYOUT_DEEPSPEED,
    CheckpointError,
    checkpoint_dir,
    list_checkpoints,
    load_checkpoint,
    verify_checkpoint,
)
from pretrain.config import Config, config_to_dict, recorded_config
from pretrain.data import ClipGeometry, config_geometry
from pretrain.model.predictor import FuturePredictor
from pretrain.model.spec import ConfigError, CoreConfig, ModelSpec, PredictorConfig
from pretrain.objective import HeldoutResult

log = logging.getLogger(__name__)

EXPORT_FORMAT = "video-pretrain-export/2"
"""The config.json format written now."""
EXPORT_FORMAT_V1 = "video-pretrain-export/1"
"""The previous format (flat model_spec), still read."""
READABLE_FORMATS = (EXPORT_FORMAT, EXPORT_FORMAT_V1)
Dtype = Literal["fp32", "bf16"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# Format 1's flat model_spec keys -> (section, field) of the nested spec.
_V1_SPEC_KEYS = {
    "core_kind": ("core", "kind"),
    "dim": ("core", "dim"),
    "core_depth": ("core", "depth"),
    "core_heads": ("core", "num_heads"),
    "core_mlp_ratio": ("core", "mlp_ratio"),
    "d_state": ("core", "d_state"),
    "d_conv": ("core", "d_conv"),
    "expand": ("core", "expand"),
    "predictor_depth": ("predictor", "depth"),
    "predictor_heads": ("predictor", "num_heads"),
    "predictor_mlp_ratio": ("predictor", "mlp_ratio"),
    "residual": ("predictor", "residual"),
}


@dataclass(frozen=True, kw_only=True, slots=True)
class EncoderRecord:
    """The frozen encoder an export was trained on (``FrozenEncoder.identity()``)."""

    name: str
    """The encoder's name, as ``FrozenEncoder.name`` gives it."""
    weights_hash: str
    """Hash of the encoder weights; eval refuses an encoder with another."""
    image_size: int
    """Side in pixels of the frames the encoder read."""
    patch_size: int
    """Patch side in pixels."""
    embed_dim: int
    """D: width of the encoder's tokens."""
    depth: int
    """Transformer blocks."""
    num_heads: int
    """Attention heads."""
    num_registers: int
    """Register tokens."""


@dataclass(frozen=True, kw_only=True, slots=True)
class IdentityControlRecord:
    """The identity-core control the trainer trained beside the export (train.identity_control)."""

    export: str
    """Where the control's export was written."""
    heldout: list[HeldoutResult]
    """The control's held-out future-prediction results, per offset."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TrackingRecord:
    """The MLflow run that trained the export: eval logs into the same store, linked to it."""

    uri: str
    """Tracking URI of the training run's store (a SQLite file for the default)."""
    experiment: str
    """MLflow experiment of the training run."""
    run_id: str
    """The training run's id."""


@dataclass(kw_only=True, slots=True)
class ExportConfig:
    """config.json of an export, typed (format ``EXPORT_FORMAT``; ``from_json`` also reads format 1)."""

    step: int
    """Optimizer step of the exported weights."""
    model_spec: ModelSpec
    """Everything needed to rebuild the trainable model."""
    encoder: EncoderRecord
    """The frozen encoder the model was trained on."""
    training: Config
    """The resolved training config (config.json "config")."""
    data: dict[str, Any]
    """What the run recorded about its data (videos and windows, or shard manifests): a record, not settings."""
    clip_geometry: ClipGeometry | None
    """How frames were decoded, cropped and windowed; None for shard runs whose summary predates it."""
    code_version: str
    """Package version (+ git commit) that wrote the export."""
    dtype: Dtype | None = None
    """Dtype of model.safetensors; set by ``write_export``."""
    heldout: list[HeldoutResult] | None = None
    """The trainer's held-out future-prediction results, per offset (None: not recorded)."""
    identity_control: IdentityControlRecord | None = None
    """The identity-core control, when one was trained."""
    tracking: TrackingRecord | None = None
    """The MLflow run that trained the export (None: tracking was off)."""

    def to_json(self) -> dict[str, Any]:
        """The config.json record (plain JSON types), in the current format."""
        record: dict[str, Any] = {
            "format": EXPORT_FORMAT,
            "step": self.step,
            "model_spec": self.model_spec.to_dict(),
            "encoder": dataclasses.asdict(self.encoder),
            "data": self.data,
        }
        if self.clip_geometry is not None:
            record["clip_geometry"] = self.clip_geometry.to_dict()
        record["config"] = config_to_dict(self.training)
        record["code_version"] = self.code_version
        if self.dtype is not None:
            record["dtype"] = self.dtype
        if self.heldout is not None:
            record["heldout"] = [dataclasses.asdict(r) for r in self.heldout]
        if self.identity_control is not None:
            record["identity_control"] = {
                "export": self.identity_control.export,
                "heldout": [dataclasses.asdict(r) for r in self.identity_control.heldout],
            }
        if self.tracking is not None:
            record["tracking"] = dataclasses.asdict(self.tracking)
        return record

    @classmethod
    def from_json(cls, record: Any, where: str = "config.json") -> ExportConfig:
        """Parse and validate a config.json record of format 2 or 1; ValueError names ``where`` and the key."""
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        found = record.get("format")
        if found not in READABLE_FORMATS:
            raise ValueError(f"{where}: format {found!r}, expected one of {', '.join(READABLE_FORMATS)}")
        known = {"format", "step", "model_spec", "encoder", "data", "clip_geometry", "config", "code_version"}
        known |= {"dtype", "heldout", "identity_control", "tracking"}
        known |= {"objective"} if found == EXPORT_FORMAT_V1 else set()
        unknown = sorted(set(record) - known)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown} (format {found})")
        try:
            dtype = record.get("dtype")
            if dtype is not None and dtype not in get_args(Dtype):
                raise ValueError(f"dtype {dtype!r}, expected one of {', '.join(get_args(Dtype))}")
            geometry = record.get("clip_geometry")
            control = record.get("identity_control")
            tracking = record.get("tracking")
            return cls(
                step=int(record["step"]),
                model_spec=spec_from_record(record["model_spec"]),
                encoder=EncoderRecord(**record["encoder"]),
                training=recorded_config(record["config"]),
                data=dict(record.get("data") or {}),
                clip_geometry=None if geometry is None else ClipGeometry.from_dict(geometry),
                code_version=str(record["code_version"]),
                dtype=dtype,
                heldout=None if record.get("heldout") is None else [HeldoutResult(**r) for r in record["heldout"]],
                identity_control=None
                if control is None
                else IdentityControlRecord(
                    export=str(control["export"]), heldout=[HeldoutResult(**r) for r in control["heldout"]]
                ),
                tracking=None if tracking is None else TrackingRecord(**tracking),
            )
        except ConfigError as err:
            raise ValueError(f"{where}: {err}") from err
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where}: malformed export config ({type(err).__name__}: {err})") from err


def spec_from_record(record: dict[str, Any]) -> ModelSpec:
    """A ``ModelSpec`` from its JSON record: nested (format 2, checkpoints of this code) or flat (format 1).

    The flat layout is lifted into the nested one key by key (``_V1_SPEC_KEYS``);
    a key of neither layout is refused by ``ModelSpec.from_dict``.
    """
    if not isinstance(record, dict) or "core" in record:
        return ModelSpec.from_dict(record)
    nested: dict[str, Any] = {"core": {}, "predictor": {}}
    for key, value in record.items():
        if key in _V1_SPEC_KEYS:
            section, name = _V1_SPEC_KEYS[key]
            nested[section][name] = value
        else:
            nested[key] = value
    for section, cls in (("core", CoreConfig), ("predictor", PredictorConfig)):
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in nested[section]]
        if missing:
            raise ConfigError(f"config key 'model_spec': a format-1 spec lacks the {section} keys {missing}")
    return ModelSpec.from_dict(nested)


def code_version() -> str:
    """Package version, plus the git commit when running from a checkout."""
    try:
        version = metadata.version("video-pretrain")
    except metadata.PackageNotFoundError:
        version = "unknown"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return f"{version}+g{commit}"
    except (OSError, subprocess.SubprocessError):
        return version


def export_config(meta: dict[str, Any], config: dict[str, Any], step: int) -> dict[str, Any]:
    """config.json of an export (``ExportConfig.to_json``): model spec, encoder, data summary, config, geometry.

    ``meta`` is what a checkpoint records ("model_spec", "encoder",
    "data_summary"), ``config`` the resolved config as a dict. The result is
    a plain dict so that the trainer can add its held-out results
    ("heldout", "identity_control") before ``write_export`` validates it.

    "clip_geometry" (``pretrain.data.ClipGeometry``) is the one record of how
    frames were decoded, cropped and windowed, so that eval measures an offset
    as the same time gap: lifted out of a shard summary (the builder's rate and
    short side come from the shards' manifest; data.source='videos' builds
    shards too), derived from the config for a data.source='videos' run whose
    summary predates it. Left out for a shard run whose summary predates it
    (checkpoints of older code): eval then falls back (see ``eval.selfsup``).
    """
    summary = dict(meta.get("data_summary", {}))
    geometry = summary.pop("clip_geometry", None)
    if config["data"]["source"] != "videos":
        # data.videos is the default list, never read by a shard run: recorded, it would name videos the
        # model never saw. The shards it did see are in the data record (spec, clip length, rate, geometry).
        config = {**config, "data": {**config["data"], "videos": []}}
    training = recorded_config(config)
    if geometry is None and training.data.source == "videos":
        geometry = config_geometry(config).to_dict()
    return ExportConfig(
        step=step,
        model_spec=spec_from_record(meta["model_spec"]),
        encoder=EncoderRecord(**meta["encoder"]),
        training=training,
        data=summary,
        clip_geometry=None if geometry is None else ClipGeometry.from_dict(geometry),
        code_version=code_version(),
    ).to_json()


def is_export_dir(path: Path) -> bool:
    """An earlier export (its config.json names an export format): the only directory an export replaces."""
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("format") in READABLE_FORMATS
    except (OSError, ValueError, AttributeError):
        return False


def write_export(model_state: dict[str, torch.Tensor], export_cfg: dict[str, Any], out_dir: Path, dtype: str) -> Path:
    """Write model.safetensors + config.json as one directory, published whole.

    ``export_cfg`` (``export_config``, plus what the trainer added) is checked
    against ``ExportConfig`` first and written in the current format.
    ``out_dir`` may not exist, be empty, or hold an earlier export; anything
    else is refused (OutputDirError) before a byte is written.
    """
    record = ExportConfig.from_json({"format": EXPORT_FORMAT, **export_cfg, "dtype": dtype}, "export config")
    with output_dir(out_dir, is_ours=is_export_dir, what="an export") as tmp:
        tensors = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in model_state.items()}
        save_file(tensors, tmp / "model.safetensors", metadata={"format": EXPORT_FORMAT})
        (tmp / "config.json").write_text(json.dumps(record.to_json(), indent=2) + "\n")
    return Path(out_dir)


def export_run(run_dir: Path, out_dir: Path, dtype: str = "fp32") -> Path:
    """Export the newest checkpoint of a run, after checking it against its checksum manifest."""
    tags = list_checkpoints(checkpoint_dir(run_dir))
    if not tags:
        raise CheckpointError(f"{run_dir} has no checkpoint to export (expected {checkpoint_dir(run_dir)}/step_*)")
    newest = tags[-1]
    verify_checkpoint(newest)
    state, config = load_checkpoint(newest)
    export_cfg = export_config(state["meta"], config, state["trainer"]["step"])
    return write_export(checkpoint_weights(newest, state), export_cfg, out_dir, dtype)


def checkpoint_weights(tag_dir: Path, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The trainable model's full fp32 weights from a checkpoint: as saved, or consolidated from ZeRO shards."""
    if state.get("layout") != LAYOUT_DEEPSPEED:
        return state["model"]
    # Imported here: eval loads exports through this module and must not pull in deepspeed.
    from pretrain.parallelize import consolidate_zero_checkpoint

    return consolidate_zero_checkpoint(tag_dir)


def read_export_config(export_dir: Path) -> ExportConfig:
    """The typed config.json of an export (format 2, or 1 lifted into it): the one way to read it."""
    cfg_path = Path(export_dir) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"export is missing {cfg_path}")
    try:
        record = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{cfg_path} is not valid JSON: {err}") from err
    return ExportConfig.from_json(record, str(cfg_path))


def open_export(export_dir: Path, device: str | torch.device = "cpu") -> tuple[FuturePredictor, ExportConfig]:
    """Rebuild the trainable model from an export: (model in eval mode, typed config.json)."""
    export_dir = Path(export_dir)
    weights_path = export_dir / "model.safetensors"
    for path in (export_dir / "config.json", weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"export is missing {path}")
    config = read_export_config(export_dir)
    model = FuturePredictor(config.model_spec)
    try:
        state = {k: v.float() for k, v in load_file(weights_path).items()}
    except (OSError, SafetensorError) as err:  # a truncated or foreign file
        raise ValueError(f"{weights_path} is not a readable safetensors file: {err}") from err
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights_path} does not match its model_spec: missing {missing}, unexpected {unexpected}")
    return model.to(device).eval(), config


def _spec_differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys where two model-spec records differ (nested sections compared key by key)."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _spec_differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key} (export {va!r}, this run {vb!r})")
    return out


def init_from_export(model: FuturePredictor, export_dir: Path, encoder_hash: str) -> int:
    """Start ``model`` from an export's weights (``train.init_from``: continued pre-training); tensors loaded.

    The export must have been trained on the same frozen encoder (same weights
    hash) and have the same model spec as ``model``; a mismatch is a
    ConfigError naming every key that differs. One exception: an identity-core
    model (the identity control of a continued run) takes everything but the
    core, so that the control starts from the same adapter and predictor.
    """
    key = "train.init_from"
    try:
        exported, config = open_export(Path(export_dir))
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{key}: {export_dir} is not a readable export: {err}") from err
    if config.encoder.weights_hash != encoder_hash:
        raise ConfigError(
            f"{key}: {export_dir} was trained on encoder {config.encoder.name} "
            f"(weights {config.encoder.weights_hash[:12]}), this run's encoder has weights {encoder_hash[:12]}"
        )
    theirs, ours = spec_dict(config.model_spec), spec_dict(model.spec)
    skip_core = ours["core"]["kind"] == "identity" and theirs["core"]["kind"] != "identity"
    if skip_core:
        theirs, ours = {**theirs, "core": None}, {**ours, "core": None}
    differences = _spec_differences(theirs, ours)
    if differences:
        raise ConfigError(f"{key}: {export_dir} has another model spec: {'; '.join(differences)}")
    state = {k: v for k, v in exported.state_dict().items() if not (skip_core and k.startswith("core."))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{key}: {export_dir} weights do not fit: missing {missing}, unexpected {unexpected}")
    log.info(
        "initialized %d tensors from %s (step %d)%s",
        len(state),
        export_dir,
        config.step,
        ", all but the core" if skip_core else "",
    )
    return len(state)


def load_export(export_dir: Path, device: str | torch.device = "cpu") -> tuple[FuturePredictor, dict[str, Any]]:
    """``open_export`` with config.json as a plain dict in the current format (``ExportConfig.to_json``)."""
    model, config = open_export(export_dir, device)
    return model, config.to_json()


def spec_dict(spec: ModelSpec) -> dict[str, Any]:
    """The JSON record of a model spec (what checkpoints and exports store)."""
    return spec.to_dict()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = parser.parse_args(argv)
    try:
        out = export_run(args.run_dir, args.out_dir, args.dtype)
    except (CheckpointError, OutputDirError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
