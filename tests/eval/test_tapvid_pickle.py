"""TAP-Vid pickles are read as plain data: real files load, a file that would run code or is no pickle is refused.

The published TAP-Vid files are pickles of dicts and lists of numpy arrays;
``pickle.load`` would also run whatever callable a crafted file names. Each
payload below leaves a marker file when its code runs, so a refused load is
checked by its missing side effect, not only by the error.
"""

from __future__ import annotations

import builtins
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from eval.formats import read_tapvid
from eval.run import main as run_main
from tests.eval.test_formats import tapvid_record


def _davis_layout(points: int = 3) -> dict[str, dict[str, np.ndarray]]:
    """TAP-Vid DAVIS: {video name: {"video", "points", "occluded"}}, arrays of several dtypes and layouts."""
    first = tapvid_record(frames=4, size=8, points=points)
    second = tapvid_record(frames=3, size=6, points=1)
    # A Fortran-ordered and a strided array exercise numpy's non-contiguous pickle paths.
    second["video"] = np.asfortranarray(second["video"])
    second["points"] = np.repeat(second["points"], 2, axis=1)[:, ::2]
    return {"bear": first, "car-shadow": second}


def _assert_same_videos(path: Path, expected: dict[str, dict[str, np.ndarray]]) -> None:
    videos = read_tapvid(path)
    assert [v.name for v in videos] == list(expected)
    for video, record in zip(videos, expected.values(), strict=True):
        np.testing.assert_array_equal(video.frames_THWC, record["video"])
        np.testing.assert_array_equal(video.tracks_QT2, record["points"])
        np.testing.assert_array_equal(video.visible_QT, ~record["occluded"])


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_real_format_tapvid_pickles_still_load(tmp_path: Path, protocol: int) -> None:
    """DAVIS layout (dict of videos) and Kinetics layout (list of videos), as pickle.load would read them."""
    davis = _davis_layout()
    davis_path = tmp_path / "tapvid_davis.pkl"
    davis_path.write_bytes(pickle.dumps(davis, protocol=protocol))
    _assert_same_videos(davis_path, davis)
    kinetics = [davis["bear"], davis["car-shadow"]]
    kinetics_path = tmp_path / "tapvid_kinetics.pkl"
    kinetics_path.write_bytes(pickle.dumps(kinetics, protocol=protocol))
    _assert_same_videos(kinetics_path, {"0": kinetics[0], "1": kinetics[1]})


def test_numpy_scalars_and_containers_load(tmp_path: Path) -> None:
    """Metadata a benchmark file may carry beside the arrays: numpy scalars, sets, bytes, nested lists."""
    record = {**tapvid_record(), "fps": np.float32(24.0), "frames": np.int64(3), "tags": {"a", "b"}, "raw": b"x"}
    for protocol in (2, 5):
        path = tmp_path / f"meta{protocol}.pkl"
        path.write_bytes(pickle.dumps({"bear": record}, protocol=protocol))
        (video,) = read_tapvid(path)
        np.testing.assert_array_equal(video.tracks_QT2, record["points"])


class _RunsShell:
    """Unpickling calls os.system: touches the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _RunsPython:
    """Unpickling calls exec: writes the marker from Python."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


class _NumpyWritesFile:
    """Unpickling calls numpy.save, a numpy global that is not array reconstruction: writes the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return np.save, (str(self.marker), np.zeros(1))


@pytest.mark.parametrize("payload", [_RunsShell, _RunsPython, _NumpyWritesFile])
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickle_that_runs_code_is_refused(tmp_path: Path, payload: type, protocol: int) -> None:
    """The payload hides inside an otherwise valid DAVIS-layout file; loading names the file and runs nothing."""
    marker = tmp_path / "marker.npy" if payload is _NumpyWritesFile else tmp_path / "marker"
    davis = _davis_layout()
    davis["bear"]["occluded"] = payload(marker)
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(davis, protocol=protocol))
    with pytest.raises(ValueError, match=r"evil\.pkl: .*refusing to load global"):
        read_tapvid(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content",
    [b"", b"this is a text file, not a pickle\n", os.urandom(256), pickle.dumps({"bear": tapvid_record()})[:-40]],
    ids=["empty", "text", "random", "truncated"],
)
def test_file_that_is_not_a_pickle_is_a_value_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "davis.pkl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"davis\.pkl: not a"):
        read_tapvid(path)


def test_pickle_of_something_else_is_a_value_error(tmp_path: Path) -> None:
    path = tmp_path / "davis.pkl"
    for data, what in ((3, "int"), ({"bear": [1, 2]}, "'bear' is a list")):
        path.write_bytes(pickle.dumps(data))
        with pytest.raises(ValueError, match=what):
            read_tapvid(path)


@pytest.mark.parametrize("kind", ["evil", "random"])
def test_cli_refuses_a_bad_tapvid_file_in_one_line(tiny_export: Path, tmp_path: Path, capsys, kind: str) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / f"{kind}.pkl"
    payload = {"bear": _RunsShell(marker)} if kind == "evil" else None
    path.write_bytes(pickle.dumps(payload) if payload is not None else os.urandom(512))
    argv = ["--export", str(tiny_export), "--task", "point_tracking", "--data", f"tapvid:{path}", "--steps=2"]
    assert run_main([*argv, "--out", str(tmp_path / "out"), "--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(path) in err[0]
    assert not marker.exists() and not (tmp_path / "out").exists()
