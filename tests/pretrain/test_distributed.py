"""Distributed training on CPU: 2 gloo ranks under torchrun, 127.0.0.1 only, every wait bounded.

Each multi-rank test launches ``tests/pretrain/dist_worker.py`` under torchrun
(c10d rendezvous on a free local port) with a subprocess timeout, and reads
what the ranks wrote. The fast tests at the top check the pieces without a
group: launcher environment parsing, the generated DeepSpeed config, config
validation.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.config import ConfigError, load_config
from pretrain.distributed import launch_env
from pretrain.parallelize import DeepSpeedEngine, LocalEngine, TrainEngine, deepspeed_config
from pretrain.trainer import Trainer
from tests.conftest import tiny_overrides
from tests.data_shards.shard_fixtures import real_clips, write_clip_shards
from tests.pretrain.dist_worker import run_fixed

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("dist_worker.py")
LAUNCH_TIMEOUT_S = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_cmd(mode: str, out: Path, *args: str, max_restarts: int = 0) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc-per-node=2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
        f"--max-restarts={max_restarts}",
        "--monitor-interval=0.5",
        str(WORKER),
        mode,
        str(out),
        *args,
    ]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def _launch(mode: str, out: Path, *args: str, max_restarts: int = 0, **env: str) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    cmd = _torchrun_cmd(mode, out, *args, max_restarts=max_restarts)
    return subprocess.run(cmd, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _params(out: Path, tag: str, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(out / f"{tag}_params_rank{rank}.pt")


def _info(out: Path, tag: str, rank: int) -> dict:
    return json.loads((out / f"{tag}_rank{rank}.json").read_text())


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key, **({"rtol": 0, "atol": 0} | tol))


# ---- no process group ----


def test_launch_env_from_torchrun_and_deepspeed_launcher() -> None:
    assert launch_env({}) is None
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    env = launch_env({**torchrun, "TORCHELASTIC_RESTART_COUNT": "3", "TORCHELASTIC_USE_AGENT_STORE": "True"})
    assert (env.rank, env.world_size, env.restart_count, env.agent_store) == (1, 2, 3, True)
    assert launch_env(torchrun).agent_store is False
    with pytest.raises(RuntimeError, match="MASTER_PORT"):
        launch_env({k: v for k, v in torchrun.items() if k != "MASTER_PORT"})


def test_ranks_leave_the_group_together_and_a_missing_rank_only_delays_the_exit_by_the_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging
    import threading

    import torch.distributed as dist

    from pretrain.distributed import LEFT_KEY, wait_for_all_to_leave

    already_out = dist.HashStore()
    already_out.add(LEFT_KEY, 1)
    assert wait_for_all_to_leave(already_out, 2, timeout_s=5.0) == 2
    # A peer still tearing its group down: this rank waits for it.
    late = dist.HashStore()
    threading.Timer(0.3, lambda: late.add(LEFT_KEY, 1)).start()
    start = time.monotonic()
    assert wait_for_all_to_leave(late, 2, timeout_s=5.0) == 2
    assert 0.25 <= time.monotonic() - start < 5.0
    # A peer that never comes: the exit is delayed by the bound, not forever, and the log says so.
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="pretrain.distributed"):
        assert wait_for_all_to_leave(dist.HashStore(), 2, timeout_s=0.3) == 1
    assert 0.3 <= time.monotonic() - start < 5.0
    assert "1 of 2 ranks out" in caplog.text

    class HostGone:
        def add(self, key: str, value: int) -> int:
            raise RuntimeError("Connection reset by peer")

    # The store's host only closes it once every rank is out.
    assert wait_for_all_to_leave(HostGone(), 2, timeout_s=5.0) == 2


def test_deepspeed_config_is_generated_from_the_typed_config(tmp_path: Path) -> None:
    cfg = load_config(
        "tiny-cpu",
        tiny_overrides(tmp_path, "--train.grad_accum=3", "--train.grad_clip=0", "--distributed.zero_stage=2"),
    )
    plan = cfg.batch_plan(world_size=4)
    ds = deepspeed_config(cfg, plan, torch.device("cpu"))
    assert ds["train_batch_size"] == 2 * 3 * 4 == plan.global_batch_size
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (2, 3)
    # DeepSpeed would clip at 1.0 if the key were left out.
    assert ds["gradient_clipping"] == 0.0
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] is False
    assert deepspeed_config(cfg, plan, torch.device("cuda"))["bf16"]["enabled"] is True


def test_both_engines_implement_the_whole_engine_interface() -> None:
    """The trainer and checkpointer only see TrainEngine: each engine must have every method of it."""
    methods = {name for name, value in vars(TrainEngine).items() if callable(value) and not name.startswith("_")}
    assert methods == {"backward", "step", "state_dict", "load_state_dict", "save", "load"}
    for engine in (LocalEngine, DeepSpeedEngine):
        for name in (*methods, "__call__"):
            assert callable(getattr(engine, name, None)), f"{engine.__name__}.{name}"
        assert isinstance(engine.sharded, bool)
    assert (LocalEngine.sharded, DeepSpeedEngine.sharded) == (False, True)


def test_distributed_config_validation_names_the_key(tmp_path: Path) -> None:
    for bad, key in (("--distributed.zero_stage=3", "zero_stage"), ("--distributed.engine=fsdp", "engine")):
        with pytest.raises(ConfigError, match=rf"distributed\.{key}"):
            load_config("tiny-cpu", tiny_overrides(tmp_path, bad))
    with pytest.raises(ConfigError, match=r"distributed\.optimizer"):
        load_config("tiny-cpu", tiny_overrides(tmp_path, "--distributed.optimizer=adamw_fused"))


# ---- 2 gloo ranks under torchrun ----


@pytest.mark.slow
def test_gradients_are_averaged_across_ranks(tmp_path: Path) -> None:
    """Ranks fed different halves of a batch end identical and equal to one process on the whole batch.

    Accumulation (2 micro-batches) and clipping (active at 0.05) go through DeepSpeed on the ranks
    and through the torch engine in the reference.
    """
    common = ("--objective.visible_fraction=0.0", "--train.steps=3", "--train.lr=0.01", "--train.grad_clip=0.05")
    overrides = tiny_overrides(
        tmp_path / "ranks", *common, "--train.micro_batch_size=1", "--train.grad_accum=2", "--distributed.zero_stage=2"
    )
    _ok(_launch("fixed", tmp_path, *overrides))
    rank0, rank1 = _params(tmp_path, "fixed", 0), _params(tmp_path, "fixed", 1)
    _assert_equal(rank0, rank1)

    # One process, micro-batches of 2 (both ranks' clips), the same two draws per step.
    one_overrides = tiny_overrides(tmp_path / "one", *common, "--train.micro_batch_size=2", "--train.grad_accum=2")
    one = Trainer(load_config("tiny-cpu", one_overrides))
    initial = {k: v.detach().clone() for k, v in one.model.state_dict().items()}
    run_fixed(one, steps=3)
    reference = {k: v.detach() for k, v in one.model.state_dict().items()}
    assert any(not torch.equal(initial[k], reference[k]) for k in initial)
    # Summing the halves' gradients across ranks and averaging a batch of two in one process round
    # differently; AdamW turns that noise into updates of up to ~lr * noise / eps where a gradient is
    # (near) zero, e.g. the keys' bias, whose gradient is zero under the softmax (measured: 1.5e-6 there,
    # 7e-5 on one head bias). Training on the wrong data moves parameters by ~lr = 1e-2.
    _assert_equal(rank0, reference, rtol=1e-4, atol=5e-4)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2], ids=["zero1", "zero2"])
def test_zero_save_resume_is_exact_and_export_is_consolidated(tmp_path: Path, stage: int) -> None:
    overrides = tiny_overrides(tmp_path, f"--distributed.zero_stage={stage}", "--train.grad_accum=2")
    _ok(_launch("resume", tmp_path, "--stop-at=3", *overrides))
    straight, resumed = _info(tmp_path, "straight", 0), _info(tmp_path, "resumed", 0)
    assert straight["step"] == resumed["step"] == 6 and straight["world_size"] == 2
    assert resumed["history"] == straight["history"]
    _assert_equal(_params(tmp_path, "resumed", 0), _params(tmp_path, "straight", 0))
    _assert_equal(_params(tmp_path, "straight", 1), _params(tmp_path, "straight", 0))
    # The export, consolidated from the ZeRO shards, holds exactly the trained (unsharded) weights.
    export = tmp_path / "tiny-cpu" / "export"
    _assert_equal(load_file(export / "model.safetensors"), _params(tmp_path, "straight", 0))
    assert json.loads((export / "config.json").read_text())["step"] == 6
    tag = tmp_path / "stopped" / "checkpoints" / "step_00000006"
    assert {p.name for p in tag.glob("rank_*.pt")} == {"rank_00000.pt", "rank_00001.pt"}
    assert len(list((tag / "engine").glob("zero_pp_rank_*_optim_states.pt"))) == 2


@pytest.mark.slow
def test_killed_rank_restarts_the_group_and_finishes(tmp_path: Path) -> None:
    overrides = tiny_overrides(tmp_path, "--train.ckpt_every=2", "--distributed.zero_stage=1")
    proc = _launch("train", tmp_path, *overrides, max_restarts=1, KILL_RANK_AT_STEP="1:3")
    _ok(proc)
    for rank in (0, 1):
        info = _info(tmp_path, "final", rank)
        assert info["restart"] == 1 and info["step"] == 6
        # Resumed from the step-2 checkpoint: the loss history is whole, with no step repeated.
        assert [s for s, _ in info["history"]] == [1, 2, 3, 4, 5, 6]
    _assert_equal(_params(tmp_path, "final", 0), _params(tmp_path, "final", 1))
    assert (tmp_path / "tiny-cpu" / "export" / "model.safetensors").is_file()


@pytest.mark.slow
def test_sigterm_to_every_rank_checkpoints_and_exits_zero(tmp_path: Path) -> None:
    overrides = tiny_overrides(tmp_path, "--train.steps=1000", "--train.log_every=100")
    out = tmp_path
    cmd = _torchrun_cmd("train", out, *overrides)
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(READY_AT_STEP="2"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        ready = [out / f"ready_rank{r}" for r in (0, 1)]
        while not all(p.is_file() for p in ready) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(p.is_file() for p in ready), "ranks never reached step 2"
        for path in ready:
            os.kill(int(path.read_text()), signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, err.decode()[-4000:]
    steps = {_info(out, "final", r)["step"] for r in (0, 1)}
    assert len(steps) == 1 and 2 <= steps.pop() < 1000
    latest = (tmp_path / "tiny-cpu" / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{_info(out, 'final', 0)['step']:08d}"


@pytest.mark.slow
def test_hung_rank_fails_the_run_with_an_error_naming_the_rank(tmp_path: Path) -> None:
    overrides = tiny_overrides(tmp_path, "--distributed.timeout_s=4")
    start = time.monotonic()
    proc = _launch("train", tmp_path, *overrides, HANG_RANK="1")
    assert proc.returncode != 0
    assert "rank 0/2: collective" in proc.stderr and "timeout_s=4" in proc.stderr, proc.stderr[-4000:]
    assert time.monotonic() - start < 100


@pytest.mark.slow
def test_ranks_read_disjoint_shards(tmp_path: Path) -> None:
    clips = real_clips("carphone", clip_frames=10, num_clips=6, short_side=64)
    shards = tmp_path / "shards"
    write_clip_shards(shards, [clips[i::4] for i in range(4)])
    overrides = tiny_overrides(
        tmp_path, "--data.source=clips", f"--data.shards={shards}", "--data.num_workers=1", "--data.shuffle_buffer=4"
    )
    _ok(_launch("keys", tmp_path, *overrides))
    keys = [json.loads((tmp_path / f"keys_rank{r}.json").read_text()) for r in (0, 1)]
    assert keys[0] and keys[1]
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == sorted(c.key for c in clips)


@pytest.mark.slow
def test_lone_process_deepspeed_engine_resumes_exactly(tmp_path: Path) -> None:
    """distributed.engine='deepspeed' without a launcher: a world of one, same exact resume as the torch engine."""
    extra = ("--distributed.engine=deepspeed", "--distributed.zero_stage=1")
    straight = Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path / "a", *extra)))
    straight.train(finalize=False)
    Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path / "b", *extra))).train(stop_at=3)
    resumed = Trainer(load_config("tiny-cpu", tiny_overrides(tmp_path / "b", *extra)))
    resumed.train(finalize=False)
    assert resumed.state.history == straight.state.history
    _assert_equal(resumed.model.state_dict(), straight.model.state_dict())
    assert json.loads((tmp_path / "b" / "tiny-cpu" / "deepspeed_config.json").read_text())["train_batch_size"] == 2


# ---- the real launch scripts, driving the real CLI ----


def _launcher_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return _env(PATH=f"{bin_dir}:{os.environ.get('PATH', '')}", MASTER_PORT=str(_free_port()), **extra)


def _run_launcher(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)


def _assert_two_rank_run(out: Path, proc: subprocess.CompletedProcess) -> None:
    _ok(proc)
    run_dir = out / "tiny-cpu"
    ds_config = json.loads((run_dir / "deepspeed_config.json").read_text())
    assert ds_config["train_batch_size"] == 2 * 2  # micro 2 x accum 1 x 2 ranks
    assert (run_dir / "export" / "model.safetensors").is_file()
    assert json.loads((run_dir / "export" / "config.json").read_text())["step"] == 6
    assert "copy-last" in proc.stdout


@pytest.mark.slow
def test_torchrun_launcher_script(tmp_path: Path) -> None:
    env = _launcher_env(tmp_path, NPROC_PER_NODE="2", RDZV_ENDPOINT=f"127.0.0.1:{_free_port()}")
    proc = _run_launcher(["bash", "launchers/torchrun.sh", *tiny_overrides(tmp_path)], env)
    _assert_two_rank_run(tmp_path, proc)


@pytest.mark.slow
def test_deepspeed_launcher_script(tmp_path: Path) -> None:
    env = _launcher_env(tmp_path, NUM_GPUS="2", MASTER_ADDR="127.0.0.1")
    proc = _run_launcher(["bash", "launchers/deepspeed.sh", *tiny_overrides(tmp_path)], env)
    _assert_two_rank_run(tmp_path, proc)


@pytest.mark.slow
def test_slurm_script_with_srun_and_scontrol_stand_ins(tmp_path: Path) -> None:
    """slurm.sbatch's own logic (master address, rendezvous, torchrun per node) under fake srun/scontrol."""
    fake_bin = tmp_path / "fake-slurm-bin"
    fake_bin.mkdir()
    # srun: drop its own --options and run the command once (one node).
    (fake_bin / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (fake_bin / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\n")
    for tool in ("srun", "scontrol"):
        (fake_bin / tool).chmod(0o755)
    env = _launcher_env(
        tmp_path,
        SLURM_JOB_NODELIST="localhost",
        SLURM_NNODES="1",
        SLURM_JOB_ID="4242",
        GPUS_PER_NODE="2",
        MAX_RESTARTS="0",
    )
    env["PATH"] = f"{fake_bin}:{env['PATH']}"
    proc = _run_launcher(["bash", "launchers/slurm.sbatch", *tiny_overrides(tmp_path)], env)
    _assert_two_rank_run(tmp_path, proc)
