"""Trainer: exact resume, checkpoints, SIGTERM, non-finite guard, export round trip."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import CheckpointError, list_checkpoints, read_latest
from pretrain.config import load_config
from pretrain.export import export_run, load_export
from pretrain.trainer import NonFiniteLossError, Trainer
from tests.conftest import tiny_overrides


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_resume_is_exact(tmp_path: Path) -> None:
    straight = Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path / "a")))
    straight.train(finalize=False)

    first = Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path / "b")))
    first.train(stop_at=3)
    assert read_latest(first.run_dir).name == "step_00000003"
    del first
    resumed = Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path / "b")))
    resumed.train(finalize=False)

    assert resumed.state.step == straight.state.step == 6
    assert resumed.state.history == straight.state.history
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_keep_last_and_latest_pointer(tmp_path: Path) -> None:
    cfg = load_config("tiny-cpu", tiny_overrides(tmp_path, "--train.ckpt_every=1", "--train.keep_last=2"))
    trainer = Trainer(cfg)
    trainer.train(finalize=False)
    root = trainer.run_dir / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step_00000005", "step_00000006"]
    assert (root / "latest").read_text().strip() == "step_00000006"
    assert not list(root.glob(".tmp-*"))


def test_latest_pointing_at_incomplete_checkpoint_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "run" / "checkpoints"
    (root / "step_00000009").mkdir(parents=True)
    (root / "latest").write_text("step_00000009\n")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        read_latest(tmp_path / "run")


def test_resume_with_a_different_model_is_refused(tmp_path: Path) -> None:
    Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path))).train(stop_at=2)
    other = Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path, "--core.kind=mamba")))
    with pytest.raises(CheckpointError, match=r"core\.kind"):
        other.train()


class _RecordingLogger:
    """A MetricLogger that keeps what it is given."""

    where = "recorded"
    run_id = None
    uri = ""

    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []

    def log_params(self, params) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path, artifact_path=None) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass

    def steps_of(self, name: str) -> list[int]:
        return [step for step, metrics in self.metrics if name in metrics]


def test_eval_every_logs_heldout_metrics_and_leaves_training_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pretrain.trainer as trainer_module

    plain = Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path / "plain")))
    plain.train(finalize=False)

    logger = _RecordingLogger()
    monkeypatch.setattr(trainer_module, "build_logger", lambda *args, **kwargs: logger)
    trainer = Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path / "eval", "--train.eval_every=2")))
    result = trainer.train()
    # Steps 2 and 4 by train.eval_every; step 6 (the last) by the final evaluation.
    for offset in (1, 2, 4):
        for name in ("heldout_l1", "copy_last_l1", "gain_vs_copy_last"):
            assert logger.steps_of(f"{name}_offset{offset}") == [2, 4, 6], name
    final = {step: m for step, m in logger.metrics if "heldout_l1_offset1" in m}[6]
    (r1,) = [r for r in result.heldout if r.offset == 1]
    assert final["heldout_l1_offset1"] == r1.model_l1 and final["gain_vs_copy_last_offset1"] == pytest.approx(r1.gain)
    # Every step log has the data wait and, beside it, the frozen encoder's time.
    step_logs = [m for _, m in logger.metrics if "loss" in m]
    assert len(step_logs) == 6
    assert all({"data_wait_share", "encode_s", "encode_share"} <= m.keys() for m in step_logs)
    # Evaluating along the way changes nothing in training.
    assert trainer.state.history == plain.state.history
    for key, value in _params(plain).items():
        torch.testing.assert_close(_params(trainer)[key], value, rtol=0, atol=0, msg=key)


def test_sigterm_checkpoints_and_returns(tmp_path: Path) -> None:
    trainer = Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path, "--train.steps=1000")))
    original = trainer.train_step

    def step_then_signal():
        out = original()
        if trainer.state.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    trainer.train_step = step_then_signal
    assert threading.current_thread() is threading.main_thread()
    result = trainer.train()
    assert result.stopped_early
    assert 2 <= result.step < 1000
    assert read_latest(trainer.run_dir).name == f"step_{result.step:08d}"


def test_nonfinite_steps_are_skipped_then_abort(tmp_path: Path) -> None:
    cfg = load_config("tiny-cpu", tiny_overrides(tmp_path, "--train.max_nonfinite_steps=3"))
    trainer = Trainer(cfg)
    before = _params(trainer)
    with torch.no_grad():
        trainer.model.mask_token.fill_(float("nan"))
    nan_state = _params(trainer)
    with pytest.raises(NonFiniteLossError, match="3 consecutive"):
        trainer.train(finalize=False)
    assert trainer.state.skipped_steps == 3
    # No optimizer step was taken: everything except the poisoned token is unchanged.
    after = _params(trainer)
    for key in before:
        if key != "mask_token":
            torch.testing.assert_close(after[key], nan_state[key], rtol=0, atol=0)


def test_export_round_trip(tmp_path: Path) -> None:
    trainer = Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path)))
    result = trainer.train()
    assert result.export_dir is not None
    model, meta = load_export(result.export_dir)
    assert meta["encoder"]["weights_hash"] == trainer.encoder.weights_hash
    assert meta["model_spec"]["core"]["kind"] == "gmmix"
    assert meta["step"] == 6 and "code_version" in meta and meta["data"]["videos"][0]["name"]
    for key, value in trainer.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value.cpu(), rtol=0, atol=0)
    # The CLI path from a run dir gives the same weights.
    again = export_run(trainer.run_dir, tmp_path / "export2")
    assert json.loads((again / "config.json").read_text())["model_spec"] == meta["model_spec"]
    assert {r.offset for r in result.heldout} == {1, 2, 4}
    # Residual + zero head: the untrained model is exactly copy-last.
    for r in result.heldout_untrained:
        assert r.model_l1 == pytest.approx(r.copy_last_l1, rel=1e-5)


def test_export_of_a_run_without_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        export_run(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mismatched_export_weights(tmp_path: Path) -> None:
    trainer = Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path)))
    export_dir = trainer.train().export_dir
    cfg = json.loads((export_dir / "config.json").read_text())
    cfg["model_spec"]["predictor"]["depth"] += 1
    (export_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match"):
        load_export(export_dir)


def test_gradient_accumulation_matches_one_big_batch(tmp_path: Path) -> None:
    """2 micro-batches of 1 accumulated == 1 micro-batch of 2: same gradients (same clips, no visible tokens)."""
    grads = []
    fixed = None
    for micro, accum in ((2, 1), (1, 2)):
        cfg = load_config(
            "tiny-cpu",
            tiny_overrides(
                tmp_path / f"m{micro}",
                f"--train.micro_batch_size={micro}",
                f"--train.grad_accum={accum}",
                "--objective.visible_fraction=0.0",
                "--train.grad_clip=0.0",
            ),
        )
        trainer = Trainer(cfg)
        torch.nn.init.normal_(trainer.model.head.weight, std=0.02)
        if fixed is None:
            fixed = trainer.sampler.next_batch(2)
        slices = iter([fixed] if micro == 2 else [fixed.rows(0, 1), fixed.rows(1, 2)])
        trainer.sampler.next_batch = lambda n, it=slices: next(it)
        captured = {}

        def record(captured=captured, model=trainer.model):
            captured.update({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})

        trainer.optimizer.step = record
        trainer.train_step()
        grads.append(captured)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for key in grads[0]:
        torch.testing.assert_close(grads[0][key], grads[1][key], rtol=1e-4, atol=1e-7, msg=key)
