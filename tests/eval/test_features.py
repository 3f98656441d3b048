"""The shared feature path: variants, protocols, and the encoder check by hash."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from data_shards import features as shard_features
from eval.features import (
    VARIANTS,
    EncoderMismatchError,
    FeaturePath,
    build_feature_path,
    load_checked_encoder,
    read_export,
)
from eval.run import main as run_main
from pretrain.config import load_config
from pretrain.encoder import load_encoder
from pretrain.model.cores import CORE_KINDS, build_core
from tests.conftest import tiny_overrides
from tests.eval.conftest import tiny_data_args
from tests.pretrain.test_export_isolation import write_v1_export


@pytest.mark.parametrize("kind", CORE_KINDS)
def test_the_parallel_forward_equals_streaming_frame_by_frame_for_every_core(kind: str) -> None:
    """The feature path runs the core's parallel forward; frame by frame (``stream``) is the reference,
    for the outputs and for the gradients a fine-tuned readout sends back into the core."""
    torch.manual_seed(0)
    adapter = torch.nn.Linear(12, 8)
    core = build_core(kind, 8, depth=2, num_heads=2, d_state=4)
    tokens_BTND = torch.randn(2, 5, 3, 12)
    weights_TNd = torch.randn(5, 3, 8)
    grads = []
    for run in ("forward", "stream"):
        path = FeaturePath(adapter, core, "streaming")
        path.zero_grad()
        out = path(tokens_BTND) if run == "forward" else path.stream(tokens_BTND)
        (out * weights_TNd).sum().backward()
        grads.append({n: p.grad.clone() for n, p in path.named_parameters() if p.grad is not None})
        if run == "forward":
            parallel = out.detach()
        else:
            torch.testing.assert_close(parallel, out.detach(), rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_variants_stream_like_clips(tiny_export: Path, variant: str) -> None:
    export = read_export(tiny_export)
    D = export.spec.encoder_dim
    tokens_BTND = torch.randn(2, 4, export.spec.grid_h * export.spec.grid_w, D)
    with torch.no_grad():
        streaming = build_feature_path(export, variant, "streaming", "frozen", seed=3).stream(tokens_BTND)
        clip = build_feature_path(export, variant, "clip", "frozen", seed=3)(tokens_BTND)
    torch.testing.assert_close(streaming, clip, rtol=1e-5, atol=1e-5)


def test_variants_train_what_the_probe_mode_says(tiny_export: Path) -> None:
    export = read_export(tiny_export)

    def trainable(variant: str, probe: str) -> bool:
        return build_feature_path(export, variant, "clip", probe, seed=0).trainable

    # Frozen means frozen for every variant: the readout is the only thing that trains.
    assert [trainable(v, "frozen") for v in VARIANTS] == [False, False, False]
    assert all(trainable(v, "finetune") for v in VARIANTS)
    pretrained = build_feature_path(export, "pretrained", "clip", "frozen", seed=0)
    for name, value in pretrained.core.state_dict().items():
        torch.testing.assert_close(value, export.model.core.state_dict()[name])
    # The identity baseline reads the export's own adapter: it differs from pretrained in the core alone.
    identity = build_feature_path(export, "identity", "clip", "frozen", seed=0)
    for name, value in identity.adapter.state_dict().items():
        torch.testing.assert_close(value, export.model.adapter.state_dict()[name])
    random_core = build_feature_path(export, "random", "clip", "frozen", seed=0).core.state_dict()
    assert any(not torch.equal(random_core[k], v) for k, v in pretrained.core.state_dict().items())
    # Finetuning a variant must not move the export's own weights (the suite shares them).
    finetuned = build_feature_path(export, "pretrained", "clip", "finetune", seed=0)
    assert finetuned.adapter[1].weight.data_ptr() != export.model.adapter[1].weight.data_ptr()


def _export_with_hash(tiny_export: Path, tmp_path: Path, weights_hash: str) -> Path:
    copy = tmp_path / "export"
    shutil.copytree(tiny_export, copy)
    config = json.loads((copy / "config.json").read_text())
    config["encoder"]["weights_hash"] = weights_hash
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_encoder_hash_mismatch_is_refused(tiny_export: Path, tmp_path: Path) -> None:
    real_hash = read_export(tiny_export).encoder_hash
    export = read_export(_export_with_hash(tiny_export, tmp_path, "0123456789abcdef"))
    with pytest.raises(EncoderMismatchError) as err:
        load_checked_encoder(export)
    assert "0123456789abcdef" in str(err.value) and real_hash in str(err.value)


def test_cli_reports_hash_mismatch(tiny_export: Path, tmp_path: Path, eval_cache: Path, capsys) -> None:
    export_dir = _export_with_hash(tiny_export, tmp_path, "0123456789abcdef")
    args = ["--export", str(export_dir), "--task", "depth", "--out", str(tmp_path / "out"), *tiny_data_args(eval_cache)]
    assert run_main(args) == 2
    assert "0123456789abcdef" in capsys.readouterr().err


def test_missing_recorded_encoder_path_asks_for_encoder(tiny_export: Path, tmp_path: Path) -> None:
    copy = tmp_path / "export"
    shutil.copytree(tiny_export, copy)
    config = json.loads((copy / "config.json").read_text())
    config["config"]["encoder"]["source"] = "/nowhere/encoder"
    (copy / "config.json").write_text(json.dumps(config))
    export = read_export(copy)
    with pytest.raises(FileNotFoundError, match="--encoder"):
        load_checked_encoder(export)
    # --encoder points at weights that are here (for the tiny export: the seeded random ViT).
    assert load_checked_encoder(export, "random").weights_hash == export.encoder_hash


def test_one_encoder_mismatch_error() -> None:
    """Eval refuses a mismatched encoder with the class the feature shards raise: one except catches both."""
    assert EncoderMismatchError is shard_features.EncoderMismatchError


def test_a_format_1_export_is_evaluated_like_a_new_one(tmp_path: Path) -> None:
    cfg = load_config("tiny-cpu", tiny_overrides(tmp_path))
    encoder = load_encoder("random", arch="vit_test", image_size=56, device="cpu", seed=cfg.run.seed)
    write_v1_export(tmp_path / "export", cfg, encoder.identity())
    export = read_export(tmp_path / "export")
    assert export.spec.core.kind == "gmmix" and export.config.training.objective.visible_fraction == 0.05
    assert load_checked_encoder(export).weights_hash == encoder.weights_hash
    tokens_BTND = torch.randn(1, 3, export.spec.num_tokens, export.spec.encoder_dim)
    with torch.no_grad():
        features = build_feature_path(export, "pretrained", "streaming", "frozen", seed=0)(tokens_BTND)
    assert features.shape == (1, 3, export.spec.num_tokens, export.spec.core.dim)
