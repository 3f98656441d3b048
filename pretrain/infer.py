"""Entry point: ``python -m pretrain.infer --export DIR --video FILE [--out OUT] [--fps F] [--short-side S]
[--max-frames N] [--visualize] [--device cpu|cuda|auto]``.

Runs an export frame by frame over one video (``pretrain.inference.StreamingModel.step``)
and writes, in OUT (default ``./infer-<video stem>``), published whole
(``data_shards.io.output_dir``: nothing is left half-written, and a
directory this command did not write is never replaced):

- ``features.safetensors``: ``tokens_TNd``, the core's output tokens of every
  frame, (T, N, d) bf16, N = grid_h * grid_w patches in row-major order. Its
  metadata (strings) records ``format``, ``grid_h``, ``grid_w``, ``times_s``
  (a JSON list: presentation time in seconds of the source frame behind each
  output frame), ``fps`` (the output rate, '' for the native one),
  ``short_side``, the video's path and SHA-256, the export's path and the
  SHA-256 of its model.safetensors, the encoder's name and weights hash.

With ``--visualize``, also:

- ``pca.mp4``: side by side, the frame the encoder saw (its centred square),
  a 3-component PCA of the encoder's patch tokens and the same of the core's
  output tokens, as RGB. Each basis is fitted once over the whole video
  (from running sums, in constant memory), so colours are stable over time.
- ``pca_frames.png``: four frames of that video, titled.
- ``prediction_error.png`` and ``prediction_error.csv``: per frame, the L1
  between ``predict(state, offset=k)`` made k steps earlier and the frame's
  layer-normed encoder tokens, against copy-last (the tokens k steps
  earlier), at offsets 1, 2 and 4 (those the export covers). The metric is
  the trainer's held-out one (``pretrain.objective.l1_per_position``) with
  every token masked: the trainer's held-out numbers give the predictor 5%
  visible target tokens, so they are somewhat lower.

Frames are decoded with PyAV (``data_shards.video.VideoReader``, any
container FFmpeg reads; variable frame rates are placed on the output time
grid by presentation time). By default at the export's step rate
(``StreamingModel.step_fps``: a step is the strided frame the core was
trained on, so offsets mean the time gaps it learned) and with the short
side the trainer decoded at; ``--fps`` and ``--short-side`` override them.
Memory stays constant over the video: tokens go to disk as they are made.

Prints OUT on stdout, and the frames/s on stderr. Exit codes: 0 done; 2 a
request that cannot be carried out (missing or malformed export, an encoder
whose weights hash differs from the export's, a missing file, not a video,
a video without frames, an OUT that would lose files), reported as one
``error:`` line on stderr with nothing written.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor
from tqdm import tqdm

from data_shards.build import h264_encoder
from data_shards.io import check_output_dir, file_sha256, output_dir
from data_shards.video import VideoDecodeError, VideoReader, probe_video
from pretrain.inference import StreamingModel, StreamState
from pretrain.objective import l1_per_position, normed_targets

log = logging.getLogger("pretrain.infer")

FEATURES_FORMAT = "video-pretrain-infer-features/1"
"""The ``format`` metadata of features.safetensors."""
FEATURES_FILE = "features.safetensors"
TOKENS_KEY = "tokens_TNd"
PCA_VIDEO_FILE = "pca.mp4"
PCA_STILL_FILE = "pca_frames.png"
ERROR_PLOT_FILE = "prediction_error.png"
ERROR_CSV_FILE = "prediction_error.csv"
PLOT_OFFSETS = (1, 2, 4)
"""Offsets of the prediction-error plot (those above the export's max_offset are left out)."""
DECODE_CHUNK = 16
"""Frames decoded per read: the only frames held in memory at once."""
PANEL = 224
"""Side in pixels of each panel of pca.mp4."""
PCA_CLIP_STD = 2.5
"""A PCA component maps to the full colour range over +-this many of its standard deviations."""
STILL_FRAMES = 4

# Requests that cannot be carried out as asked; each message names the path or the setting.
# ValueError covers EncoderMismatchError and OutputDirError.
USER_ERRORS = (ValueError, FileNotFoundError, VideoDecodeError)


def is_infer_dir(path: Path) -> bool:
    """An earlier output of this command (its features.safetensors names FEATURES_FORMAT): the only OUT replaced."""
    try:
        with safe_open(str(Path(path) / FEATURES_FILE), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FEATURES_FORMAT
    except Exception:  # a missing, truncated or foreign file: not ours
        return False


class _Spill:
    """Rows of one fixed shape appended to a raw file as they are made; read back as a memory map."""

    def __init__(self, path: Path, row_shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.row_shape, self.dtype = path, row_shape, np.dtype(dtype)
        self.rows = 0
        self._file: BinaryIO | None = open(path, "wb")  # noqa: SIM115  (closed by close())

    def append(self, row: np.ndarray) -> None:
        if row.shape != self.row_shape or row.dtype != self.dtype:
            raise ValueError(f"spill {self.path.name}: row {row.dtype} {row.shape}, expected {self.row_shape}")
        assert self._file is not None
        self._file.write(np.ascontiguousarray(row).tobytes())
        self.rows += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def array(self) -> np.ndarray:
        """The rows written, (rows, *row_shape), memory-mapped read-only."""
        self.close()
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.rows, *self.row_shape))


def _bf16_bits(x: Tensor) -> np.ndarray:
    """A tensor as bf16, its bits as int16 (numpy has no bfloat16)."""
    return x.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy()


def _from_bf16_bits(bits: np.ndarray) -> Tensor:
    return torch.from_numpy(np.array(bits, dtype=np.int16)).view(torch.bfloat16).float()


def write_safetensors_from_spill(spill: _Spill, key: str, path: Path, metadata: dict[str, str]) -> None:
    """One bf16 tensor ``key`` of shape (rows, *row_shape) from a spill of bf16 bits, streamed into ``path``.

    The safetensors layout (8-byte little-endian header length, JSON header
    padded to 8 bytes, raw data) written by hand: safetensors' own writer
    needs the whole tensor in memory, and a long video's tokens need not fit.
    """
    spill.close()
    shape = [spill.rows, *spill.row_shape]
    nbytes = spill.rows * math.prod(spill.row_shape) * 2
    header = {"__metadata__": metadata, key: {"dtype": "BF16", "shape": shape, "data_offsets": [0, nbytes]}}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as out, open(spill.path, "rb") as src:
        out.write(len(text).to_bytes(8, "little"))
        out.write(text)
        while block := src.read(1 << 22):
            out.write(block)
    spill.path.unlink()


class _PcaBasis:
    """Top-3 principal components of token vectors, fitted from running sums (constant memory)."""

    def __init__(self, dim: int) -> None:
        self.sum_D = torch.zeros(dim, dtype=torch.float64)
        self.outer_DD = torch.zeros(dim, dim, dtype=torch.float64)
        self.count = 0
        self.mean_D: Tensor | None = None
        self.components_D3: Tensor | None = None
        self.scale_3: Tensor | None = None

    def add(self, tokens_ND: Tensor) -> None:
        x_ND = tokens_ND.detach().to("cpu", torch.float64)
        self.sum_D += x_ND.sum(0)
        self.outer_DD += x_ND.T @ x_ND
        self.count += x_ND.shape[0]

    def fit(self) -> None:
        mean_D = self.sum_D / self.count
        cov_DD = self.outer_DD / self.count - torch.outer(mean_D, mean_D)
        eigvals, eigvecs = torch.linalg.eigh(cov_DD)
        components_D3 = eigvecs[:, -3:].flip(-1)
        # eigh's signs are arbitrary: make each component's largest loading positive, so a rerun paints the same.
        signs = components_D3.gather(0, components_D3.abs().argmax(0, keepdim=True)).sign()
        self.components_D3 = (components_D3 * signs).float()
        self.scale_3 = (PCA_CLIP_STD * eigvals[-3:].flip(-1).clamp_min(1e-12).sqrt()).float()
        self.mean_D = mean_D.float()

    def colors(self, tokens_ND: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        """RGB of each token, (3, grid_h, grid_w) uint8: the three components over +-PCA_CLIP_STD std."""
        assert self.mean_D is not None and self.components_D3 is not None and self.scale_3 is not None
        proj_N3 = (tokens_ND.float() - self.mean_D) @ self.components_D3 / self.scale_3
        rgb_N3 = ((proj_N3.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return rgb_N3.T.reshape(3, *grid_hw)


@dataclass(slots=True)
class ErrorRow:
    """Future-prediction error of one frame at one offset (per frame: the mean over its N tokens)."""

    frame: int
    time_s: float
    offset: int
    model_l1: float
    copy_last_l1: float


class _PredictionErrors:
    """Predictions made k steps ago, scored when their frame arrives; holds at most max(offsets) frames."""

    def __init__(self, offsets: tuple[int, ...]) -> None:
        self.offsets = offsets
        self.pending: dict[tuple[int, int], Tensor] = {}
        self.recent_normed: deque[Tensor] = deque(maxlen=max(offsets) + 1)
        self.rows: list[ErrorRow] = []

    def update(self, m: StreamingModel, state: StreamState, frame: int, time_s: float) -> None:
        tokens_BND = state.last_tokens_BND
        for k in self.offsets:
            pred_BND = self.pending.pop((frame, k), None)
            if pred_BND is None:
                continue
            copy_BND = self.recent_normed[-k]
            model_l1 = l1_per_position(pred_BND[:, None], tokens_BND[:, None]).mean().item()
            copy_l1 = l1_per_position(copy_BND[:, None], tokens_BND[:, None]).mean().item()
            self.rows.append(ErrorRow(frame, time_s, k, model_l1, copy_l1))
        self.recent_normed.append(normed_targets(tokens_BND))
        for k in self.offsets:
            self.pending[(frame + k, k)] = m.predict(state, offset=k)


@dataclass(slots=True)
class InferResult:
    """What ``infer_video`` did."""

    out: Path
    frames: int
    seconds: float
    """Wall time of decoding and the model, visualizations excluded."""

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else float("inf")


def _features_metadata(m: StreamingModel, video: Path, times_s: list[float], fps: float | None, short_side: int):
    grid_h, grid_w = m.grid_hw
    return {
        "format": FEATURES_FORMAT,
        "grid_h": str(grid_h),
        "grid_w": str(grid_w),
        "times_s": json.dumps([round(t, 6) for t in times_s]),
        "fps": "" if fps is None else repr(float(fps)),
        "short_side": str(short_side),
        "video": str(video),
        "video_sha256": file_sha256(video),
        "export": str(m.export_dir),
        "export_sha256": m.export_sha256,
        "encoder": m.encoder.name,
        "encoder_weights_hash": m.encoder.weights_hash,
        "core": m.spec.core.kind,
        "clip_geometry": json.dumps(m.geometry.to_dict()),
    }


class _Visuals:
    """What --visualize needs, gathered frame by frame in constant memory, then written.

    The crops and encoder tokens go to spill files (read back to render the
    video); the PCA bases are running sums; prediction errors are scalars.
    """

    def __init__(self, tmp: Path, m: StreamingModel) -> None:
        N, d, D = m.spec.num_tokens, m.spec.dim, m.spec.encoder_dim
        size = m.encoder.image_size
        self.m = m
        self.crops = _Spill(tmp / ".frames.bin", (3, size, size), np.uint8)
        self.encoder_tokens = _Spill(tmp / ".encoder_tokens.bin", (N, D), np.int16)
        self.pca_encoder, self.pca_core = _PcaBasis(D), _PcaBasis(d)
        self.offsets = tuple(k for k in PLOT_OFFSETS if k <= m.spec.max_offset)
        self.errors = _PredictionErrors(self.offsets) if self.offsets else None

    def add(self, crop_CHW: Tensor, tokens_BNd: Tensor, state: StreamState, frame: int, time_s: float) -> None:
        """A frame's crop, its core tokens and the state after it (holding its encoder tokens)."""
        self.crops.append(crop_CHW.numpy())
        self.encoder_tokens.append(_bf16_bits(state.last_tokens_BND[0]))
        self.pca_encoder.add(state.last_tokens_BND[0])
        self.pca_core.add(tokens_BNd[0])
        if self.errors is not None:
            self.errors.update(self.m, state, frame, time_s)

    def write(self, tmp: Path, times_s: list[float], fps: float, title: str) -> None:
        """pca.mp4 and pca_frames.png (reading the core tokens back from features.safetensors), the error plot."""
        self.pca_encoder.fit()
        self.pca_core.fit()
        frames_TCHW, encoder_TND = self.crops.array(), self.encoder_tokens.array()
        with safe_open(str(tmp / FEATURES_FILE), framework="pt") as features:
            core_slice = features.get_slice(TOKENS_KEY)

            def row(t: int) -> np.ndarray:
                encoder_ND, core_ND = _from_bf16_bits(encoder_TND[t]), core_slice[t].float()
                return _panels(frames_TCHW[t], encoder_ND, core_ND, self.m, self.pca_encoder, self.pca_core)

            _write_mp4(tmp / PCA_VIDEO_FILE, (row(t) for t in range(len(frames_TCHW))), fps)
            _write_still(tmp / PCA_STILL_FILE, row, times_s)
        for spill in (self.crops, self.encoder_tokens):
            spill.path.unlink()
        if self.errors is not None:
            _write_error_csv(tmp / ERROR_CSV_FILE, self.errors.rows)
            _plot_errors(tmp / ERROR_PLOT_FILE, self.errors.rows, self.offsets, title, self.m)


def infer_video(
    m: StreamingModel,
    video: str | Path,
    out: str | Path,
    *,
    fps: float | None = None,
    short_side: int | None = None,
    max_frames: int | None = None,
    visualize: bool = False,
    progress: bool | None = None,
) -> InferResult:
    """Stream ``video`` through ``m`` and write OUT (see the module docstring); returns what was done.

    ``fps``: output rate (None: ``m.step_fps`` of the video's rate);
    ``short_side``: decode size (None: ``m.short_side``); ``progress``: a
    tqdm bar on stderr (None: when stderr is a terminal). Each decoded chunk
    of DECODE_CHUNK frames is encoded in one encoder call (frames are
    encoded independently, so this is ``step`` batched), then the core steps
    frame by frame. Raises VideoDecodeError for a file that is not a
    readable video or has no frames, OutputDirError for an OUT that would
    lose files; nothing is written then.
    """
    video, out = Path(video), Path(out)
    check_output_dir(out, is_ours=is_infer_dir, what="inference output")
    short_side = short_side or m.short_side
    native_fps = probe_video(video).fps or None
    fps = fps or m.step_fps(native_fps)

    def chunk_size(done: int) -> int:
        return DECODE_CHUNK if max_frames is None else min(DECODE_CHUNK, max_frames - done)

    with VideoReader(video, fps=fps, short_side=short_side) as reader:
        # The first chunk before OUT is touched: a video without frames writes nothing.
        chunk = reader.read(chunk_size(0))
        if len(chunk.frames_THWC) == 0:
            raise VideoDecodeError(video, "too_short", f"no frame decoded (fps={fps})")
        estimate = round(reader.info.duration_s * fps) if fps and reader.info.duration_s else reader.info.num_frames
        total = min(filter(None, (max_frames, estimate)), default=None)
        with output_dir(out, is_ours=is_infer_dir, what="inference output") as tmp:
            tokens = _Spill(tmp / ".tokens.bin", (m.spec.num_tokens, m.spec.dim), np.int16)
            visuals = _Visuals(tmp, m) if visualize else None
            times_s: list[float] = []
            state = m.init_state(1)
            bar = tqdm(total=total, unit="frame", desc=video.name, disable=None if progress is None else not progress)
            started = time.perf_counter()
            while len(chunk.frames_THWC):
                crops_TCHW = m.prepare(chunk.frames_THWC)
                tokens_1TND, x_1TNd = m.encode(crops_TCHW[None].to(m.device))
                for t, time_s in enumerate(chunk.times_s):
                    tokens_BNd, state = m.step_tokens(tokens_1TND[:, t], x_1TNd[:, t], state)
                    tokens.append(_bf16_bits(tokens_BNd[0]))
                    if visuals is not None:
                        visuals.add(crops_TCHW[t], tokens_BNd, state, len(times_s), time_s)
                    times_s.append(time_s)
                bar.update(len(chunk.times_s))
                if max_frames is not None and len(times_s) >= max_frames:
                    break
                chunk = reader.read(chunk_size(len(times_s)))
            seconds = time.perf_counter() - started
            bar.close()
            metadata = _features_metadata(m, video, times_s, fps, short_side)
            write_safetensors_from_spill(tokens, TOKENS_KEY, tmp / FEATURES_FILE, metadata)
            if visuals is not None:
                visuals.write(tmp, times_s, fps or native_fps or 8.0, video.name)
    return InferResult(out, len(times_s), seconds)


def _panels(crop_CHW: np.ndarray, encoder_ND: Tensor, core_ND: Tensor, m: StreamingModel, pca_encoder, pca_core):
    """One frame of pca.mp4: frame | encoder PCA | core PCA, (PANEL, 3 * PANEL, 3) uint8."""
    frame_1CHW = torch.from_numpy(np.array(crop_CHW))[None].float()
    frame_CHW = F.interpolate(frame_1CHW, size=(PANEL, PANEL), mode="bilinear", antialias=True)[0]
    panels = [frame_CHW.round().clamp(0, 255).to(torch.uint8)]
    for basis, tokens_ND in ((pca_encoder, encoder_ND), (pca_core, core_ND)):
        rgb_1Chw = basis.colors(tokens_ND, m.grid_hw)[None]
        panels.append(F.interpolate(rgb_1Chw, size=(PANEL, PANEL), mode="nearest")[0])
    return torch.cat(panels, dim=2).permute(1, 2, 0).contiguous().numpy()


def _write_mp4(path: Path, frames_HWC: Iterator[np.ndarray], fps: float) -> None:
    """H.264 (yuv420p) MP4 of uint8 RGB frames of even sizes, written as they come, through PyAV."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream(h264_encoder(), rate=Fraction(fps).limit_denominator(1001))
        for index, frame_HWC in enumerate(frames_HWC):
            if index == 0:
                stream.height, stream.width = frame_HWC.shape[:2]
                stream.pix_fmt = "yuv420p"
            frame = av.VideoFrame.from_ndarray(frame_HWC, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _write_still(path: Path, row: Callable[[int], np.ndarray], times_s: list[float]) -> None:
    """STILL_FRAMES frames of pca.mp4 spread over the video, one per row, titled."""
    from matplotlib.figure import Figure

    T = len(times_s)
    picks = sorted({round(i * (T - 1) / max(1, STILL_FRAMES - 1)) for i in range(min(STILL_FRAMES, T))})
    fig = Figure(figsize=(6.6, 2.2 * len(picks)), dpi=80, layout="constrained")
    for ax, t in zip(fig.subplots(len(picks), 1, squeeze=False)[:, 0], picks):
        ax.imshow(row(t))
        ax.set_axis_off()
        ax.set_title(f"t = {times_s[t]:.2f} s   frame | encoder PCA | core PCA", fontsize=9)
    fig.savefig(path)


def _write_error_csv(path: Path, rows: list[ErrorRow]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["frame", "time_s", "offset", "model_l1", "copy_last_l1"])
        for r in rows:
            writer.writerow([r.frame, f"{r.time_s:.6f}", r.offset, f"{r.model_l1:.6f}", f"{r.copy_last_l1:.6f}"])


def _plot_errors(path: Path, rows: list[ErrorRow], offsets: tuple[int, ...], title: str, m: StreamingModel) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 1.9 * len(offsets) + 0.6), dpi=90, layout="constrained")
    axes = fig.subplots(len(offsets), 1, sharex=True, squeeze=False)[:, 0]
    for ax, k in zip(axes, offsets):
        mine = [r for r in rows if r.offset == k]
        if not mine:
            ax.text(0.5, 0.5, f"offset {k}: video too short", ha="center", va="center", transform=ax.transAxes)
            continue
        times = [r.time_s for r in mine]
        model_l1 = np.array([r.model_l1 for r in mine])
        copy_l1 = np.array([r.copy_last_l1 for r in mine])
        ax.plot(times, copy_l1, color="0.55", lw=1.2, label=f"copy-last (mean {copy_l1.mean():.3f})")
        ax.plot(times, model_l1, color="tab:blue", lw=1.2, label=f"model (mean {model_l1.mean():.3f})")
        ax.fill_between(times, model_l1, copy_l1, where=model_l1 < copy_l1, color="tab:green", alpha=0.25, lw=0)
        ax.set_ylabel(f"L1, offset {k}")
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("time of the predicted frame (s)")
    step = m.geometry.frame_stride
    fig.suptitle(
        f"{title}: future-prediction error per frame (layer-normed encoder features, every token masked; "
        f"green: model beats copy-last; {m.spec.core.kind} core, a step = {step} strided frame"
        + ("s" if step > 1 else "")
        + ")",
        fontsize=9,
        wrap=True,
    )
    fig.savefig(path)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _even_int(text: str) -> int:
    value = _positive_int(text)
    if value % 2:
        raise argparse.ArgumentTypeError(f"must be even (4:2:0 video), got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.infer",
        description="Run an export frame by frame over a video: per-frame core tokens, and optional visualizations.",
    )
    parser.add_argument("--export", required=True, type=Path, help="export directory (model.safetensors + config.json)")
    parser.add_argument("--video", required=True, type=Path, help="any video file FFmpeg reads")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: ./infer-<video stem>)")
    parser.add_argument(
        "--fps", type=_positive_float, default=None, help="frames per second fed to the model (default: the export's)"
    )
    parser.add_argument(
        "--short-side",
        type=_even_int,
        default=None,
        help="decode at this short side, pixels (default: the export's)",
    )
    parser.add_argument("--max-frames", type=_positive_int, default=None, help="stop after this many frames")
    parser.add_argument("--visualize", action="store_true", help="also write pca.mp4, pca_frames.png, the error plot")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: CUDA if available")
    parser.add_argument("--encoder", default=None, help="encoder weights to use instead of the recorded source")
    parser.add_argument("--log-level", default="WARNING", help="INFO logs the encoder loaded")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = args.out or Path(f"infer-{args.video.stem}")
    try:
        # Refuse an unsafe OUT and a missing video before minutes of model loading.
        check_output_dir(out, is_ours=is_infer_dir, what="inference output")
        if not args.video.is_file():
            raise FileNotFoundError(f"video not found: {args.video}")
        m = StreamingModel.from_export(args.export, args.device, encoder_source=args.encoder)
        result = infer_video(
            m,
            args.video,
            out,
            fps=args.fps,
            short_side=args.short_side,
            max_frames=args.max_frames,
            visualize=args.visualize,
        )
    except USER_ERRORS as err:
        # One line for the user; the traceback with --log-level DEBUG (a ValueError may also be a bug).
        log.debug("traceback of the error below", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"{result.frames} frames in {result.seconds:.1f} s: {result.frames_per_s:.1f} frames/s "
        f"(decode + encoder + core, {m.device})",
        file=sys.stderr,
    )
    print(result.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
