"""The trainable model's settings, declared once: core, predictor, and the spec an export carries.

``CoreConfig`` and ``PredictorConfig`` are the ``[core]`` and ``[predictor]``
sections of the training config (``pretrain.config.Config`` nests them) and
the same objects sit inside ``ModelSpec``, which is everything needed to
rebuild the trainable model and is stored in checkpoints and exports. The
typed builder (``build_dataclass``) reads both: unknown keys and ill-typed
values raise ``ConfigError`` naming the key.

Torch-free on purpose: tools that only read a config or an export's
config.json import this module without torch.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

CoreKind = Literal["identity", "gated_transformer", "gmmix", "mamba"]
CORE_KINDS: tuple[str, ...] = typing.get_args(CoreKind)
Memory = Literal["all", "last"]
AttnBackend = Literal["sdpa", "xformers", "math"]
"""The frozen ViT's attention kernels (encoder.attn_backend; ``pretrain.model.vit.ATTN_BACKENDS``)."""


class ConfigError(ValueError):
    """A config key is unknown, ill-typed or out of range; the message names it."""


def check(ok: bool, key: str, why: str) -> None:
    """Raise ``ConfigError`` naming ``key`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"config key '{key}': {why}")


def check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    """Raise ``ConfigError`` naming ``key`` unless ``value`` is one of ``allowed`` (a ``Literal``'s args)."""
    check(value in allowed, key, f"got {value!r}, expected one of {', '.join(allowed)}")


@dataclass(kw_only=True, slots=True)
class CoreConfig:
    kind: CoreKind = "gmmix"
    """Temporal core: identity, gated_transformer, gmmix or mamba."""
    dim: int = 128
    """Width d of the trainable part (frozen tokens are projected D -> d)."""
    depth: int = 1
    """Number of core layers."""
    num_heads: int = 4
    """Attention heads in the core."""
    mlp_ratio: float = 2.0
    """MLP hidden width / dim."""
    d_state: int = 16
    """Selective-scan state size per channel (gmmix, mamba)."""
    d_conv: int = 4
    """Causal depthwise conv kernel over time (gmmix, mamba)."""
    expand: int = 2
    """Mamba inner width / dim (gmmix, mamba)."""

    def __post_init__(self) -> None:
        check_choice("core.kind", self.kind, CORE_KINDS)
        for key in ("dim", "depth", "num_heads", "d_state", "d_conv", "expand"):
            check(getattr(self, key) > 0, f"core.{key}", "must be > 0")
        check(self.dim % self.num_heads == 0, "core.dim", "must be divisible by core.num_heads")
        check(self.mlp_ratio > 0, "core.mlp_ratio", "must be > 0")


@dataclass(kw_only=True, slots=True)
class PredictorConfig:
    depth: int = 2
    """Predictor layers (self-attention over target queries, cross-attention to memory, MLP)."""
    num_heads: int = 4
    """Predictor attention heads (width is core.dim)."""
    mlp_ratio: float = 2.0
    """Predictor MLP hidden width / dim."""
    residual: bool = True
    """Predict the change from the last source frame's token through a
    zero-initialized head, so the untrained model is the copy-last baseline."""

    def __post_init__(self) -> None:
        check(self.depth > 0, "predictor.depth", "must be > 0")
        check(self.num_heads > 0, "predictor.num_heads", "must be > 0")
        check(self.mlp_ratio > 0, "predictor.mlp_ratio", "must be > 0")


@dataclass(kw_only=True, slots=True)
class ModelSpec:
    """Everything needed to rebuild the trainable model (stored in checkpoints and exports)."""

    encoder_dim: int
    """D: width of the frozen encoder's tokens."""
    grid_h: int
    """Patch rows per frame."""
    grid_w: int
    """Patch columns per frame (N = grid_h * grid_w)."""
    core: CoreConfig
    """The temporal core (the config's [core] section)."""
    predictor: PredictorConfig
    """The predictor (the config's [predictor] section)."""
    max_source_frames: int
    """Most source frames the time embedding covers (objective.source_frames)."""
    max_offset: int
    """Largest target offset the offset embedding covers (max of objective.target_offsets)."""
    feature_layers: list[int] = field(default_factory=list)
    """Encoder blocks mixed by trainable adapters into the core's input; [] = final block only."""
    memory: Memory = "all"
    """The predictor attends to 'all' source steps' core outputs or the 'last' one's (objective.memory)."""
    max_recall: int = 0
    """Largest recall offset the recall embedding covers (max of objective.recall_offsets; 0 = no recall)."""

    def __post_init__(self) -> None:
        for key in ("encoder_dim", "grid_h", "grid_w", "max_source_frames", "max_offset"):
            check(getattr(self, key) > 0, f"model_spec.{key}", "must be > 0")
        check_choice("model_spec.memory", self.memory, typing.get_args(Memory))
        check(self.max_recall >= 0, "model_spec.max_recall", "must be >= 0")

    @property
    def num_tokens(self) -> int:
        """N: patch tokens per frame."""
        return self.grid_h * self.grid_w

    @property
    def dim(self) -> int:
        """d: the trainable width (``core.dim``)."""
        return self.core.dim

    def to_dict(self) -> dict[str, Any]:
        """The JSON record (plain types; ``core`` and ``predictor`` nested)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelSpec:
        """Inverse of ``to_dict``; ``ConfigError`` names an unknown, missing or ill-typed key."""
        return build_dataclass(cls, raw, "model_spec.")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check a raw TOML/JSON value against a field annotation; ints are accepted for floats."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if isinstance(value, bool) or value not in allowed:
            raise ConfigError(f"config key '{key}': got {value!r}, expected one of {', '.join(map(str, allowed))}")
        return value
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if annotation in (float, str) and not isinstance(value, annotation):
        raise ConfigError(f"config key '{key}': expected {annotation.__name__}, got {value!r}")
    return value


def build_dataclass(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    """A validated ``cls`` from a nested dict; nested dataclass fields take tables (sub-dicts).

    Unknown keys, missing required keys and ill-typed values raise ``ConfigError`` naming
    ``prefix + key``; fields left out take their defaults.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or cls.__name__}': expected a table, got {raw!r}")
    types_by_name = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        full_key = f"{prefix}{key}"
        if key not in types_by_name:
            raise ConfigError(f"unknown config key '{full_key}' (known: {', '.join(types_by_name)})")
        annotation = types_by_name[key]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{full_key}': expected a [{full_key}] table")
            kwargs[key] = build_dataclass(annotation, value, f"{full_key}.")
        else:
            kwargs[key] = _coerce(full_key, value, annotation)
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in kwargs:
            raise ConfigError(f"config key '{prefix}{f.name}' is missing")
    return cls(**kwargs)
