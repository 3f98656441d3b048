"""The encoder benchmark's quick mode runs end to end; the FLOP count follows the issue's formula."""

import pytest

from benchmarks import encoder as bench
from pretrain.model.vit import VIT_ARCHS


def test_flops_formula_for_vitl16_at_224() -> None:
    # L=24, d=1024, p=16, N_p=196 patches, N=196+1+4 tokens.
    L, d, Np, N = 24, 1024, 196, 201
    expected = L * (24 * N * d**2 + 4 * N**2 * d) + 6 * 16**2 * Np * d
    assert bench.flops_per_image(VIT_ARCHS["vitl16"], 224) == expected


def test_quick_run_prints_every_mode(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--quick", "--device", "cpu", "--archs", "vit_test16", "--sizes", "32", "--warmup", "0", "--iters", "1"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    for mode in ("eager-fp32", "autocast", "bf16-sdpa"):
        assert f"vit_test16    32     2 {mode}" in out
    assert "bf16-sdpa-compile" not in out
    assert "1.00x" in out
