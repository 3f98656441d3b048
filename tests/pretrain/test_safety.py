"""Never lose a user's files, never run a stranger's code: export targets, crafted and corrupt checkpoints,
resume fallbacks, moved runs, MLflow bookkeeping, SIGTERM outside the loop, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain import export as export_cli
from pretrain import train as train_cli
from pretrain.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_rank_state,
    prune_checkpoints,
    verify_checkpoint,
    write_manifest,
)
from pretrain.config import ConfigError, load_config
from pretrain.export import export_run
from pretrain.parallelize import consolidate_zero_checkpoint
from pretrain.train import format_report
from pretrain.trainer import StopFlag, Trainer, TrainResult
from tests.conftest import tiny_overrides


class _WritesAFile:
    """A pickle payload: unpickling it unrestricted creates ``path`` (the side effect tests look for)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def _one_error(capsys: pytest.CaptureFixture[str], needle: str) -> str:
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert len(lines) == 1 and needle in lines[0], err[-2000:]
    assert "Traceback" not in err
    return lines[0]


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run trained to the end, with checkpoints at steps 3 and 6 (read-only for the tests)."""
    out = tmp_path_factory.mktemp("finished")
    Trainer(load_config("tiny-cpu", tiny_overrides(out, "--train.ckpt_every=3"))).train(finalize=False)
    return out / "tiny-cpu"


def _copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest / "tiny-cpu")
    return dest / "tiny-cpu"


# ---- 1. export never deletes what is not its own ----
def test_export_refuses_a_directory_holding_unrelated_files(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "v"
    (target / "sub").mkdir(parents=True)
    (target / "notes.txt").write_text("x\n")
    assert export_cli.main([str(finished_run), str(target)]) == 2
    _one_error(capsys, str(target))
    assert (target / "notes.txt").read_text() == "x\n" and (target / "sub").is_dir()
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt", "sub"]
    assert not list(tmp_path.glob(".tmp-*"))


def test_export_refuses_the_current_directory_and_home(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    assert export_cli.main([str(finished_run), "."]) == 2
    _one_error(capsys, "current directory")
    assert export_cli.main([str(finished_run), ".."]) == 2
    _one_error(capsys, "parent of the current directory")
    assert export_cli.main([str(finished_run), str(Path.home())]) == 2
    _one_error(capsys, "home directory")
    assert export_cli.main([str(finished_run), "/"]) == 2
    _one_error(capsys, "root")
    assert (work / "keep.txt").read_text() == "mine"


def test_export_replaces_an_earlier_export_with_the_umask_permissions(finished_run: Path, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        out = export_run(finished_run, tmp_path / "export")
        (out / "config.json").write_text((out / "config.json").read_text().replace('"step": 6', '"step": 5'))
        again = export_run(finished_run, tmp_path / "export")
    finally:
        os.umask(old)
    assert json.loads((again / "config.json").read_text())["step"] == 6
    assert stat.S_IMODE(again.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in again.iterdir()} == {0o644}
    tag = list_checkpoints(finished_run / "checkpoints")[-1]
    assert stat.S_IMODE(tag.stat().st_mode) == 0o755
    assert stat.S_IMODE((tag / "manifest.json").stat().st_mode) == 0o644


# ---- 2. no code runs from a crafted checkpoint ----
def test_crafted_state_file_is_refused_by_resume_and_export(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _copy_run(finished_run, tmp_path)
    marker = tmp_path / "pwned"
    for tag in list_checkpoints(run_dir / "checkpoints"):
        torch.save({"trainer": {"step": 1}, "evil": _WritesAFile(marker)}, tag / "state.pt")
        # The attacker controls the whole directory, so the checksums match the payload.
        write_manifest(tag)
    assert export_cli.main([str(run_dir), str(tmp_path / "out")]) == 2
    _one_error(capsys, "refusing to load")
    assert train_cli.main(["--config", "tiny-cpu", *tiny_overrides(tmp_path)]) == 2
    _one_error(capsys, "refusing to load")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_crafted_rank_file_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"scheduler": _WritesAFile(marker)}, tmp_path / "rank_00001.pt")
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_rank_state(tmp_path, 1)
    assert not marker.exists()


@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_crafted_deepspeed_file_is_refused_before_deepspeed_reads_it(tmp_path: Path, victim: str) -> None:
    engine = tmp_path / "engine"
    engine.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"module": {"w": torch.zeros(2)}}, engine / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {}}, engine / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torch.save({"module": {"w": torch.zeros(2)}, "payload": _WritesAFile(marker)}, engine / victim)
    with pytest.raises(CheckpointError, match=r"would import \S*open"):
        consolidate_zero_checkpoint(tmp_path)
    assert not marker.exists()


# ---- 4. checksums: corruption is caught, the previous checkpoint is used ----
def _garble(path: Path, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes((b ^ 0x5A) for b in data[middle : middle + count])
    path.write_bytes(bytes(data))


def test_garbled_checkpoint_is_skipped_and_resume_stays_exact(
    finished_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    straight = Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path / "a")))
    straight.train(finalize=False)

    overrides = tiny_overrides(tmp_path / "b", "--train.ckpt_every=1", "--train.keep_last=3")
    Trainer(load_config("tiny-cpu", overrides)).train(stop_at=3)
    run_dir = tmp_path / "b" / "tiny-cpu"
    _garble(run_dir / "checkpoints" / "step_00000003" / "state.pt")
    with pytest.raises(CheckpointError, match="checksum"):
        verify_checkpoint(run_dir / "checkpoints" / "step_00000003")
    with pytest.raises(CheckpointError, match="checksum"):
        export_run(run_dir, tmp_path / "export")

    resumed = Trainer(load_config("tiny-cpu", overrides))
    with caplog.at_level("INFO", logger="pretrain.checkpoint"), caplog.at_level("INFO", logger="pretrain.checkpointer"):
        resumed.train(finalize=False)
    assert resumed.checkpointer.resumed_from is not None
    assert resumed.checkpointer.resumed_from.name == "step_00000002"
    assert any("skipped step_00000003" in r.getMessage() and "checksum" in r.getMessage() for r in caplog.records)
    assert resumed.state.history == straight.state.history
    for key, value in _params(straight).items():
        torch.testing.assert_close(_params(resumed)[key], value, rtol=0, atol=0, msg=key)
    for tag in list_checkpoints(run_dir / "checkpoints"):
        verify_checkpoint(tag)


def test_retention_keeps_the_newest_verified_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        (root / f"step_{step:08d}").mkdir(parents=True)
        (root / f"step_{step:08d}" / "state.pt").write_bytes(b"x")
    prune_checkpoints(root, keep_last=1, keep=root / "step_00000001")
    assert [p.name for p in list_checkpoints(root)] == ["step_00000001", "step_00000003"]


# ---- 5. resume picks the newest checkpoint that verifies ----
@pytest.mark.parametrize("damage", ["zero-byte", "truncated"])
def test_unreadable_latest_falls_back_to_the_previous_one(
    finished_run: Path, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = _copy_run(finished_run, tmp_path)
    state = run_dir / "checkpoints" / "step_00000006" / "state.pt"
    state.write_bytes(b"" if damage == "zero-byte" else state.read_bytes()[: state.stat().st_size // 2])
    trainer = Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path)))
    with caplog.at_level("WARNING", logger="pretrain.checkpointer"):
        trainer.checkpointer.maybe_resume()
    assert trainer.state.step == 3
    lines = [r.getMessage() for r in caplog.records if "resuming from" in r.getMessage()]
    assert len(lines) == 1 and "step_00000003" in lines[0] and "skipped step_00000006" in lines[0]


def test_missing_latest_pointer_adopts_the_newest_complete_checkpoint(
    finished_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = _copy_run(finished_run, tmp_path)
    (run_dir / "checkpoints" / "latest").unlink()
    trainer = Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path)))
    with caplog.at_level("INFO", logger="pretrain.checkpointer"):
        trainer.checkpointer.maybe_resume()
    assert trainer.state.step == 6
    assert any("latest" in r.getMessage() and "adopted" in r.getMessage() for r in caplog.records)


def test_stale_pointer_adopts_the_newer_complete_checkpoint(finished_run: Path, tmp_path: Path) -> None:
    run_dir = _copy_run(finished_run, tmp_path)
    (run_dir / "checkpoints" / "latest").write_text("step_00000003\n")
    trainer = Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path)))
    trainer.checkpointer.maybe_resume()
    assert trainer.state.step == 6


def test_resume_modes(finished_run: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        Trainer(
            load_config("tiny-cpu", tiny_overrides(tmp_path / "fresh", "--train.resume=must"))
        ).checkpointer.maybe_resume()
    _copy_run(finished_run, tmp_path)
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path, "--train.resume=never"))).checkpointer.maybe_resume()
    with pytest.raises(ConfigError, match=r"train\.resume"):
        load_config("tiny-cpu", ["--train.resume=sometimes"])


def test_no_checkpoint_verifies_is_an_error_not_a_fresh_start(finished_run: Path, tmp_path: Path) -> None:
    run_dir = _copy_run(finished_run, tmp_path)
    for tag in list_checkpoints(run_dir / "checkpoints"):
        (tag / "state.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* verifies"):
        Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path))).checkpointer.maybe_resume()


def test_temporaries_of_a_killed_run_are_removed(
    finished_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = _copy_run(finished_run, tmp_path)
    root = run_dir / "checkpoints"
    (root / ".latest.abc123.tmp").write_text("step_00000006")
    (root / ".tmp-step_00000009-xyz").mkdir()
    with caplog.at_level("INFO", logger="pretrain.checkpoint"):
        Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path))).checkpointer.maybe_resume()
    assert not list(root.glob(".*"))
    assert any("removed 2 temporary" in r.getMessage() for r in caplog.records)


# ---- 6 and 9: MLflow bookkeeping ----
def _client(out_dir: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{out_dir / 'mlflow.db'}")


def _runs(out_dir: Path) -> list:
    client = _client(out_dir)
    experiment = client.get_experiment_by_name("video-pretrain")
    return client.search_runs([experiment.experiment_id])


def test_moved_run_resumes_under_a_new_mlflow_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path / "a", "--tracking.enabled=true"))).train(stop_at=3)
    old_id = _runs(tmp_path / "a")[0].info.run_id
    shutil.copytree(tmp_path / "a" / "tiny-cpu", tmp_path / "b" / "tiny-cpu")
    with caplog.at_level("WARNING", logger="pretrain.tracking"):
        result = Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path / "b", "--tracking.enabled=true"))).train()
    assert result.step == 6
    assert sum("was the run moved" in r.getMessage() for r in caplog.records) == 1
    (run,) = _runs(tmp_path / "b")
    assert run.data.tags["video_pretrain.resumed_from_run_id"] == old_id
    assert run.data.tags["video_pretrain.resumed_at_step"] == "3"
    # Artifacts live beside the database, not in the working directory.
    assert not (tmp_path / "mlruns").exists()
    assert run.info.artifact_uri.startswith((tmp_path / "b" / "mlartifacts").resolve().as_uri())
    assert {a.path for a in _client(tmp_path / "b").list_artifacts(run.info.run_id)} >= {"export", "config.json"}


def test_stale_running_run_is_marked_killed_and_metrics_are_not_logged_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = tiny_overrides(tmp_path, "--tracking.enabled=true")
    Trainer(load_config("tiny-cpu", overrides)).train(stop_at=3)
    (run,) = _runs(tmp_path)
    client = _client(tmp_path)
    # A kill after step 4 was logged, before its checkpoint: the MLflow run shows step 4 and stays RUNNING.
    client.log_metric(run.info.run_id, "loss", 123.0, step=4)
    client.update_run(run.info.run_id, status="RUNNING")
    # A process killed before its first checkpoint left a second RUNNING run of the same run directory.
    orphan = client.create_run(
        run.info.experiment_id, tags={"video_pretrain.run_dir": str((tmp_path / "tiny-cpu").resolve())}
    )
    Trainer(load_config("tiny-cpu", overrides)).train(finalize=False)
    assert client.get_run(orphan.info.run_id).info.status == "KILLED"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in losses) == [1, 2, 3, 4, 5, 6]
    assert [m.value for m in losses if m.step == 4] == [123.0]


# ---- 7. no vacuous verdict ----
def test_report_without_heldout_data_says_so() -> None:
    report = format_report(TrainResult(step=6, stopped_early=False, run_dir=Path("r"), tracking="tracking disabled"))
    assert "no held-out evaluation was run" in report
    assert "beats" not in report and "finding" not in report


# ---- 9. SIGTERM outside the loop ----
def test_sigterm_during_start_up_stops_before_the_first_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import pretrain.trainer as trainer_module

    original = trainer_module.load_encoder

    def load_then_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "load_encoder", load_then_signal)
    assert train_cli.main(["--config", "tiny-cpu", *tiny_overrides(tmp_path)]) == 0
    assert "stopped before the first step" in capsys.readouterr().out
    assert not (tmp_path / "tiny-cpu" / "checkpoints").exists()


def test_sigterm_during_final_export_finishes_it(tmp_path: Path) -> None:
    with StopFlag() as stop:
        trainer = Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path)), stop=stop)
        original = trainer._finalize

        def signal_then_finalize(result):
            os.kill(os.getpid(), signal.SIGTERM)
            original(result)

        trainer._finalize = signal_then_finalize
        result = trainer.train()
    assert stop.requested and not result.stopped_early
    assert (result.export_dir / "model.safetensors").is_file()


# ---- 8. one-line errors ----
def test_run_name_may_not_leave_out_dir() -> None:
    for name in ("..", ".", "a/b", "a\\b"):
        with pytest.raises(ConfigError, match=r"run\.name"):
            load_config("tiny-cpu", [f"--run.name={name}"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the error case cannot arise")
def test_cuda_device_without_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train_cli.main(["--config", "tiny-cpu", *tiny_overrides(tmp_path, "--run.device=cuda")]) == 2
    _one_error(capsys, "run.device")
    assert not (tmp_path / "tiny-cpu").exists()


@pytest.mark.parametrize("seed", range(6))
def test_garbage_encoder_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str], seed: int) -> None:
    weights = tmp_path / "dinov2.pth"
    # Random bytes provoke different exceptions inside the unpickler (one CI run met an IndexError).
    weights.write_bytes(np.random.default_rng(seed).bytes(4096))
    assert train_cli.main(["--config", "tiny-cpu", *tiny_overrides(tmp_path, f"--encoder.source={weights}")]) == 2
    _one_error(capsys, "dinov2.pth")
    assert not (tmp_path / "tiny-cpu").exists()


@pytest.mark.parametrize("seed", range(6))
def test_garbage_checkpoint_state_is_a_checkpoint_error(tmp_path: Path, seed: int) -> None:
    from pretrain.checkpoint import safe_torch_load

    path = tmp_path / "state.pt"
    path.write_bytes(np.random.default_rng(seed).bytes(4096))
    with pytest.raises(CheckpointError, match=r"state\.pt"):
        safe_torch_load(path)


def test_truncated_checkpoint_given_to_export(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _copy_run(finished_run, tmp_path)
    state = run_dir / "checkpoints" / "step_00000006" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    assert export_cli.main([str(run_dir), str(tmp_path / "out")]) == 2
    _one_error(capsys, "step_00000006")
    assert not (tmp_path / "out").exists()


def test_checkpoint_config_that_is_not_json(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _copy_run(finished_run, tmp_path)
    for tag in list_checkpoints(run_dir / "checkpoints"):
        (tag / "config.json").write_text("{not json")
        write_manifest(tag)
    assert export_cli.main([str(run_dir), str(tmp_path / "out")]) == 2
    _one_error(capsys, "config.json is not valid JSON")


def test_export_config_that_is_not_json(tmp_path: Path) -> None:
    from pretrain.export import load_export

    (tmp_path / "config.json").write_text("]]")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        load_export(tmp_path)


@pytest.mark.parametrize("damage", ["junk", "truncated"])
def test_training_on_unreadable_shards(tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.data_shards.shard_fixtures import real_clips, write_clip_shards

    shards = tmp_path / "shards"
    if damage == "junk":
        shards.mkdir()
        (shards / "clips-000000.tar").write_bytes(os.urandom(20_000))
    else:
        write_clip_shards(shards, [real_clips("carphone", clip_frames=10, num_clips=2, short_side=64)])
        (tar,) = shards.glob("*.tar")
        tar.write_bytes(tar.read_bytes()[:700])
    overrides = tiny_overrides(tmp_path, "--data.source=clips", f"--data.shards={shards}", "--data.num_workers=1")
    assert train_cli.main(["--config", "tiny-cpu", *overrides]) == 2
    _one_error(capsys, "produced no batch")
    assert not (tmp_path / "tiny-cpu").exists()


def test_report_separates_copy_last_from_the_identity_control() -> None:
    from pretrain.objective import HeldoutResult

    heldout = [HeldoutResult(1, 10, 0.50, 0.60), HeldoutResult(2, 10, 0.55, 0.70)]
    control = TrainResult(
        6, False, Path("r-identity"), heldout=[HeldoutResult(1, 10, 0.49, 0.6), HeldoutResult(2, 10, 0.56, 0.7)]
    )
    report = format_report(TrainResult(6, False, Path("r"), heldout=heldout, identity=control, tracking="t"))
    assert "beats copy-last at every offset and the identity-core control at offset(s) [2]" in report
    control.heldout = [HeldoutResult(1, 10, 0.40, 0.6), HeldoutResult(2, 10, 0.50, 0.7)]
    report = format_report(TrainResult(6, False, Path("r"), heldout=heldout, identity=control, tracking="t"))
    assert "NOT the identity-core control" in report


def test_report_without_an_identity_control_shows_dashes_not_nan() -> None:
    from pretrain.objective import HeldoutResult

    heldout = [HeldoutResult(1, 10, 0.50, 0.60)]
    report = format_report(TrainResult(6, False, Path("r"), heldout=heldout, tracking="t"))
    (row,) = [line for line in report.splitlines() if line.split()[:1] == ["1"]]
    assert "nan" not in report
    assert row.split() == ["1", "10", "0.6000", "-", "-", "0.5000", "+16.7%", "-"]
    assert "no identity-core control was trained" in report


def test_report_ui_hint_runs_without_an_activated_venv() -> None:
    """The hint names the interpreter that trained (it has mlflow), not a bare `mlflow` that may not be on PATH."""
    from pretrain.objective import HeldoutResult

    tracking = "MLflow run abc in sqlite:////tmp/x/mlflow.db"
    result = TrainResult(6, False, Path("r"), heldout=[HeldoutResult(1, 10, 0.5, 0.6)], tracking=tracking)
    hint = next(line for line in format_report(result).splitlines() if line.startswith("open the UI"))
    assert f"{sys.executable} -m mlflow ui --backend-store-uri sqlite:////tmp/x/mlflow.db" in hint
