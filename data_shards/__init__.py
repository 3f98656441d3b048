"""Everything between video files and training batches (no model code)."""

from data_shards.scenes import cut_free_windows, detect_scene_cuts
from data_shards.video import (
    DECODE_ERROR_REASONS,
    VideoDecodeError,
    VideoInfo,
    decode_video,
    file_sha256,
    probe_video,
    resized_hw,
    sample_video_path,
)

__all__ = [
    "DECODE_ERROR_REASONS",
    "VideoDecodeError",
    "VideoInfo",
    "cut_free_windows",
    "decode_video",
    "detect_scene_cuts",
    "file_sha256",
    "probe_video",
    "resized_hw",
    "sample_video_path",
]
