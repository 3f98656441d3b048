"""python -m pretrain.infer end to end: features.safetensors, the visualizations, and every bad input as exit 2."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors import safe_open

from data_shards import decode_video, generate_video, sample_video_path
from data_shards.io import file_sha256
from pretrain.infer import ERROR_CSV_FILE, ERROR_PLOT_FILE, FEATURES_FORMAT, PANEL, PCA_STILL_FILE, PCA_VIDEO_FILE
from pretrain.infer import main as infer_main
from pretrain.inference import StreamingModel

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(capsys: pytest.CaptureFixture[str], export: Path, video: Path, out: Path, *extra: str) -> tuple[int, str]:
    rc = infer_main(["--export", str(export), "--video", str(video), "--out", str(out), "--device", "cpu", *extra])
    return rc, capsys.readouterr().err


def read_features(out: Path) -> tuple[torch.Tensor, dict[str, str]]:
    with safe_open(str(out / "features.safetensors"), framework="pt") as f:
        return f.get_tensor("tokens_TNd"), f.metadata()


def assert_refused(rc: int, err: str, out: Path) -> None:
    """Exit 2, one ``error:`` line, and nothing left: no OUT, no temporary sibling."""
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".tmp-{out.name}")]


def test_features_of_a_real_video(tiny_export: Path, tmp_path: Path, capsys) -> None:
    carphone = sample_video_path("carphone")
    out = tmp_path / "out"
    rc, err = run(capsys, tiny_export, carphone, out, "--max-frames", "6")
    assert rc == 0, err
    assert "frames/s" in err
    tokens_TNd, meta = read_features(out)
    m = StreamingModel.from_export(tiny_export)
    assert tokens_TNd.dtype == torch.bfloat16
    assert tokens_TNd.shape == (6, m.spec.num_tokens, m.spec.dim)
    assert meta["format"] == FEATURES_FORMAT
    assert (int(meta["grid_h"]), int(meta["grid_w"])) == m.grid_hw
    assert meta["export_sha256"] == file_sha256(tiny_export / "model.safetensors")
    assert meta["video_sha256"] == file_sha256(carphone)
    assert meta["encoder_weights_hash"] == m.encoder.weights_hash
    # The tiny export keeps the native rate (stride 1): carphone's own frame times, 1001/30000 s apart.
    times_s = json.loads(meta["times_s"])
    np.testing.assert_allclose(times_s, np.arange(6) * 1001 / 30000, atol=1e-4)
    assert meta["fps"] == ""
    # The tokens are the streaming model's on the frames the trainer would have decoded (bf16-rounded).
    frames_THWC, _ = decode_video(carphone, short_side=m.short_side, max_frames=6)
    expected_1TNd, _ = m.forward(frames_THWC)
    torch.testing.assert_close(tokens_TNd.float(), expected_1TNd[0], atol=2e-2, rtol=1e-2)


def test_features_of_a_procedural_video_at_a_chosen_rate(tiny_export: Path, tmp_path: Path, capsys) -> None:
    video = tmp_path / "procedural.mp4"
    generate_video(video, seed=3, frames=12, size=(64, 96), fps=8)
    out = tmp_path / "out"
    rc, err = run(capsys, tiny_export, video, out, "--fps", "4", "--short-side", "48")
    assert rc == 0, err
    tokens_TNd, meta = read_features(out)
    # 12 frames at 8 fps resampled to 4 fps by presentation time: every other frame.
    assert tokens_TNd.shape[0] == 6
    np.testing.assert_allclose(json.loads(meta["times_s"]), np.arange(6) * 0.25, atol=1e-6)
    assert float(meta["fps"]) == 4.0 and meta["short_side"] == "48"


def test_visualize_writes_a_playable_mp4_and_plots(tiny_export: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    rc, err = run(capsys, tiny_export, sample_video_path("carphone"), out, "--max-frames", "6", "--visualize")
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["features.safetensors", PCA_VIDEO_FILE, PCA_STILL_FILE, ERROR_PLOT_FILE, ERROR_CSV_FILE]
    )
    with av.open(str(out / PCA_VIDEO_FILE)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 6
    assert frames[0].shape == (PANEL, 3 * PANEL, 3)
    for name in (PCA_STILL_FILE, ERROR_PLOT_FILE):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    with open(out / ERROR_CSV_FILE) as f:
        rows = list(csv.DictReader(f))
    # Offset k is scored from frame k on: 5 + 4 + 2 rows over 6 frames.
    counts = {k: sum(r["offset"] == str(k) for r in rows) for k in (1, 2, 4)}
    assert counts == {1: 5, 2: 4, 4: 2}
    assert all(float(r["model_l1"]) > 0 and float(r["copy_last_l1"]) > 0 for r in rows)


def test_rerun_replaces_its_own_output_only(tiny_export: Path, tmp_path: Path, capsys) -> None:
    carphone = sample_video_path("carphone")
    out = tmp_path / "out"
    assert run(capsys, tiny_export, carphone, out, "--max-frames", "2")[0] == 0
    rc, err = run(capsys, tiny_export, carphone, out, "--max-frames", "3")
    assert rc == 0, err
    assert read_features(out)[0].shape[0] == 3
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    rc, err = run(capsys, tiny_export, carphone, foreign, "--max-frames", "2")
    assert rc == 2 and err.startswith("error: refusing to replace")
    assert sorted(p.name for p in foreign.iterdir()) == ["keep.txt"]


def _no_frames_avi(path: Path) -> Path:
    """An AVI with a video stream and no frame in it."""
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()
        container.mux(stream.encode(None))
    return path


def _mismatched_export(export: Path, tmp: Path) -> Path:
    copy = tmp / "export-copy"
    shutil.copytree(export, copy)
    record = json.loads((copy / "config.json").read_text())
    record["encoder"]["weights_hash"] = "0123456789abcdef"
    (copy / "config.json").write_text(json.dumps(record))
    return copy


BAD_INPUTS = ["missing_video", "not_a_video", "no_frames", "empty_file", "encoder_hash_mismatch", "missing_export"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_error_line_and_nothing_written(tiny_export: Path, tmp_path: Path, capsys, case) -> None:
    export, video = tiny_export, sample_video_path("carphone")
    if case == "missing_video":
        video = tmp_path / "nowhere.mp4"
    elif case == "not_a_video":
        video = tmp_path / "notes.mp4"
        video.write_text("not a video\n")
    elif case == "no_frames":
        video = _no_frames_avi(tmp_path / "empty.avi")
    elif case == "empty_file":
        video = tmp_path / "zero.mp4"
        video.write_bytes(b"")
    elif case == "encoder_hash_mismatch":
        export = _mismatched_export(tiny_export, tmp_path)
    elif case == "missing_export":
        export = tmp_path / "no-export"
    out = tmp_path / "outputs" / "out"
    out.parent.mkdir()
    rc, err = run(capsys, export, video, out, "--max-frames", "4", "--visualize")
    assert_refused(rc, err, out)
    if case == "encoder_hash_mismatch":
        assert "0123456789abcdef" in err
