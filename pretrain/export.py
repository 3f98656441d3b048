"""Export: trainable weights (safetensors) + config.json, the only thing eval reads.

    python -m pretrain.export RUN_DIR OUT_DIR [--dtype fp32|bf16]

``load_export`` rebuilds the trainable model from an export without importing
the trainer; eval checks ``config.json["encoder"]["weights_hash"]`` against
the encoder it loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

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
from pretrain.data import config_geometry
from pretrain.model.predictor import FuturePredictor, ModelSpec

log = logging.getLogger(__name__)

EXPORT_FORMAT = "video-pretrain-export/1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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
    """config.json of an export: model spec, encoder identity, data summary, resolved config, clip geometry.

    "clip_geometry" (``pretrain.data.ClipGeometry``) is the one record of how
    frames were decoded, cropped and windowed, so that eval measures an offset
    as the same time gap: lifted out of a shard summary (the builder's rate and
    short side come from the shards' manifest), derived from the config for
    in-memory videos. Left out for a shard run whose summary predates it
    (checkpoints of older code): eval then falls back (see ``eval.selfsup``).
    """
    summary = dict(meta.get("data_summary", {}))
    geometry = summary.pop("clip_geometry", None)
    if geometry is None and config["data"]["source"] == "videos":
        geometry = config_geometry(config).to_dict()
    return {
        "format": EXPORT_FORMAT,
        "step": step,
        "model_spec": meta["model_spec"],
        "encoder": meta["encoder"],
        "objective": config["objective"],
        "data": summary,
        **({"clip_geometry": geometry} if geometry is not None else {}),
        "config": config,
        "code_version": code_version(),
    }


def is_export_dir(path: Path) -> bool:
    """An earlier export (its config.json names the export format): the only directory an export replaces."""
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def write_export(model_state: dict[str, torch.Tensor], export_cfg: dict[str, Any], out_dir: Path, dtype: str) -> Path:
    """Write model.safetensors + config.json as one directory, published whole.

    ``out_dir`` may not exist, be empty, or hold an earlier export; anything
    else is refused (OutputDirError) before a byte is written.
    """
    with output_dir(out_dir, is_ours=is_export_dir, what="an export") as tmp:
        tensors = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in model_state.items()}
        save_file(tensors, tmp / "model.safetensors", metadata={"format": EXPORT_FORMAT})
        (tmp / "config.json").write_text(json.dumps({**export_cfg, "dtype": dtype}, indent=2) + "\n")
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


def load_export(export_dir: Path, device: str | torch.device = "cpu") -> tuple[FuturePredictor, dict[str, Any]]:
    """Rebuild the trainable model from an export: (model in eval mode, config.json dict)."""
    export_dir = Path(export_dir)
    cfg_path, weights_path = export_dir / "config.json", export_dir / "model.safetensors"
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"export is missing {path}")
    try:
        export_cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{cfg_path} is not valid JSON: {err}") from err
    if not isinstance(export_cfg, dict) or export_cfg.get("format") != EXPORT_FORMAT:
        found = export_cfg.get("format") if isinstance(export_cfg, dict) else type(export_cfg).__name__
        raise ValueError(f"{cfg_path}: format {found!r}, expected {EXPORT_FORMAT!r}")
    spec = ModelSpec(**export_cfg["model_spec"])
    model = FuturePredictor(spec)
    try:
        state = {k: v.float() for k, v in load_file(weights_path).items()}
    except (OSError, SafetensorError) as err:  # a truncated or foreign file
        raise ValueError(f"{weights_path} is not a readable safetensors file: {err}") from err
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights_path} does not match its model_spec: missing {missing}, unexpected {unexpected}")
    return model.to(device).eval(), export_cfg


def spec_dict(spec: ModelSpec) -> dict[str, Any]:
    return dataclasses.asdict(spec)


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
