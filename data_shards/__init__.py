"""Everything between video files and training batches (no model code)."""

from data_shards.build import BuildArgs, BuildResult, build_shards
from data_shards.features import ClipEncoder, EncoderMismatchError, FeatureBatch, encode_clip_shards, feature_loader
from data_shards.loader import CorruptSampleError, LoaderConfig, ShardLoader, VideoBatch, clip_loader
from data_shards.procedural import GroundTruth, generate_dataset, generate_video
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
    "BuildArgs",
    "BuildResult",
    "ClipEncoder",
    "CorruptSampleError",
    "EncoderMismatchError",
    "FeatureBatch",
    "GroundTruth",
    "LoaderConfig",
    "ShardLoader",
    "VideoBatch",
    "VideoDecodeError",
    "VideoInfo",
    "build_shards",
    "clip_loader",
    "cut_free_windows",
    "decode_video",
    "detect_scene_cuts",
    "encode_clip_shards",
    "feature_loader",
    "file_sha256",
    "generate_dataset",
    "generate_video",
    "probe_video",
    "resized_hw",
    "sample_video_path",
]
