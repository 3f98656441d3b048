"""Process groups from the launcher's environment, rank-naming collectives, metric reductions.

Every launcher this project supports ends in the same environment per process:
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.

- ``torchrun`` (also under SLURM: ``srun torchrun ...``) sets them, plus
  TORCHELASTIC_RESTART_COUNT and TORCHELASTIC_USE_AGENT_STORE (the agent
  hosts the TCPStore, every worker is a client).
- the ``deepspeed`` launcher sets them and appends ``--local_rank=N`` to the
  command line (``pretrain.train`` accepts and ignores it; LOCAL_RANK wins).

The process group is created here, before ``deepspeed.initialize``, on a
TCPStore wrapped in a PrefixStore named after TORCHELASTIC_RESTART_COUNT:
after torchrun restarts a group (a rank was SIGKILLed), keys left in the
store by the dead attempt would otherwise be read by the new one, which then
fails with "Gloo connectFullMesh failed" or hangs (seen with plain torch too;
this construction restarted cleanly 7 of 7 times). A lone process without a
launcher gets no process group (the plain torch engine), unless DeepSpeed is
asked for explicitly; then it gets a world of one on an in-process store.

Every collective the trainer issues goes through ``DistContext``, which turns a
backend timeout into ``CollectiveTimeoutError`` naming the rank and the
collective, so a hung peer fails the run after ``distributed.timeout_s``
instead of hanging it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from pretrain.config import Config, ConfigError

log = logging.getLogger(__name__)

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class CollectiveTimeoutError(RuntimeError):
    """A collective did not complete in time, or a peer died in it; the message names this rank."""


@dataclass(frozen=True, slots=True)
class LaunchEnv:
    """What the launcher told this process."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    restart_count: int
    agent_store: bool
    """torchrun's agent hosts the TCPStore: every worker connects as a client."""


def launch_env(environ: dict[str, str] | None = None) -> LaunchEnv | None:
    """The launcher's environment, or None for a lone process (no RANK and WORLD_SIZE)."""
    env = os.environ if environ is None else environ
    if "RANK" not in env and "WORLD_SIZE" not in env:
        return None
    missing = [k for k in LAUNCH_ENV if k not in env]
    if missing:
        raise RuntimeError(
            f"launcher environment incomplete: {', '.join(missing)} not set "
            f"(torchrun, the deepspeed launcher and launchers/*.sh set all of {', '.join(LAUNCH_ENV)})"
        )
    rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
    if not 0 <= rank < world_size:
        raise RuntimeError(f"RANK={rank} must be in [0, WORLD_SIZE={world_size})")
    return LaunchEnv(
        rank=rank,
        world_size=world_size,
        local_rank=int(env["LOCAL_RANK"]),
        master_addr=env["MASTER_ADDR"],
        master_port=int(env["MASTER_PORT"]),
        restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", "0")),
        agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
    )


def wants_deepspeed(cfg: Config, env: LaunchEnv | None) -> bool:
    """distributed.engine resolved: DeepSpeed under a launcher (or when asked), plain torch for a lone process."""
    if cfg.distributed.engine == "torch":
        if env is not None and env.world_size > 1:
            raise RuntimeError(
                f"distributed.engine='torch' is single-process, but WORLD_SIZE={env.world_size}; "
                "use distributed.engine='auto' or 'deepspeed' under a launcher"
            )
        return False
    return cfg.distributed.engine == "deepspeed" or env is not None


def resolve_backend(cfg: Config, device: torch.device) -> str:
    if cfg.distributed.backend != "auto":
        return cfg.distributed.backend
    return "nccl" if device.type == "cuda" else "gloo"


def resolve_device(cfg: Config, local_rank: int) -> torch.device:
    """run.device for this rank: CUDA ranks take GPU LOCAL_RANK."""
    name = cfg.run.device
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'run.device': 'cuda' but this torch sees no CUDA device (use 'cpu' or 'auto')")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


@dataclass(slots=True)
class DistContext:
    """This process's place in the group; collectives are no-ops in a world of one without a group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timeout_s: float = 600.0
    use_deepspeed: bool = False
    restart_count: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def has_group(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @contextmanager
    def collective(self, what: str) -> Iterator[None]:
        """Re-raise a backend timeout (or a peer's death) as an error naming this rank and ``what``."""
        try:
            yield
        except (RuntimeError, dist.DistBackendError) as err:
            if isinstance(err, CollectiveTimeoutError) or not _looks_like_comm_failure(err):
                raise
            raise CollectiveTimeoutError(
                f"rank {self.rank}/{self.world_size}: collective '{what}' failed or timed out "
                f"(distributed.timeout_s={self.timeout_s:g}); another rank is hung or died. Backend said: {err}"
            ) from err

    def barrier(self, what: str) -> None:
        if self.world_size == 1 or not self.has_group:
            return
        with self.collective(f"barrier: {what}"):
            # An all-reduce, not dist.barrier: the same timeout and error path as every other collective.
            dist.all_reduce(torch.zeros(1, device=self._comm_device()))

    def all_reduce_sum(self, values_V: torch.Tensor, what: str) -> torch.Tensor:
        """Sum of a float vector over ranks (the vector itself in a world of one)."""
        if self.world_size == 1 or not self.has_group:
            return values_V
        out_V = values_V.detach().to(self._comm_device(), torch.float64).clone()
        with self.collective(what):
            dist.all_reduce(out_V)
        return out_V.to(values_V.device)

    def all_reduce_max(self, values_V: torch.Tensor, what: str) -> torch.Tensor:
        if self.world_size == 1 or not self.has_group:
            return values_V
        out_V = values_V.detach().to(self._comm_device(), torch.float64).clone()
        with self.collective(what):
            dist.all_reduce(out_V, op=dist.ReduceOp.MAX)
        return out_V.to(values_V.device)

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def _looks_like_comm_failure(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, dist.DistBackendError) or any(
        s in text for s in ("timed out", "timeout", "connection reset", "connection closed", "gloo", "nccl")
    )


def setup(cfg: Config) -> DistContext:
    """Join (or create) the process group this run needs; idempotent within a process."""
    env = launch_env()
    use_ds = wants_deepspeed(cfg, env)
    local_rank = env.local_rank if env else 0
    device = resolve_device(cfg, local_rank)
    ctx = DistContext(
        rank=env.rank if env else 0,
        world_size=env.world_size if env else 1,
        local_rank=local_rank,
        device=device,
        timeout_s=cfg.distributed.timeout_s,
        use_deepspeed=use_ds,
        restart_count=env.restart_count if env else 0,
    )
    if not use_ds:
        return ctx
    if dist.is_initialized():
        if dist.get_world_size() != ctx.world_size:
            raise RuntimeError(f"a process group of {dist.get_world_size()} exists; this run needs {ctx.world_size}")
        return ctx
    backend = resolve_backend(cfg, device)
    timeout = timedelta(seconds=cfg.distributed.timeout_s)
    _default_group_timeout(timeout)
    store = _make_store(env, timeout)
    global _EXIT_STORE
    _EXIT_STORE = store if ctx.world_size > 1 else None
    dist.init_process_group(
        backend, store=store, rank=ctx.rank, world_size=ctx.world_size, timeout=timeout, device_id=_device_id(device)
    )
    log.info(
        "rank %d/%d (local %d) joined a %s group on %s (restart %d)",
        ctx.rank,
        ctx.world_size,
        ctx.local_rank,
        backend,
        f"{env.master_addr}:{env.master_port}" if env else "an in-process store",
        ctx.restart_count,
    )
    return ctx


def _default_group_timeout(timeout: timedelta) -> None:
    """Make groups created later (DeepSpeed's data-parallel group) time out like the world group.

    ``new_group`` without a timeout takes torch's module default (30 min for
    gloo, 10 for nccl), and DeepSpeed passes none: a hung peer in a ZeRO
    gradient all-reduce would otherwise outwait distributed.timeout_s.
    """
    c10d = dist.distributed_c10d
    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout


def _device_id(device: torch.device) -> torch.device | None:
    # Binding NCCL to its GPU up front avoids a guess (and a warning) at the first collective.
    return device if device.type == "cuda" else None


def _make_store(env: LaunchEnv | None, timeout: timedelta) -> dist.Store:
    if env is None:
        # A lone process asked for DeepSpeed: no port, nothing to collide with. DeepSpeed's
        # sanity check still wants LOCAL_RANK; RANK/WORLD_SIZE stay unset so that a later
        # Trainer in this process is not mistaken for a launched one.
        os.environ.setdefault("LOCAL_RANK", "0")
        return dist.HashStore()
    is_master = env.rank == 0 and not env.agent_store
    tcp = dist.TCPStore(
        env.master_addr, env.master_port, env.world_size, is_master=is_master, timeout=timeout, wait_for_workers=False
    )
    # A fresh namespace per torchrun attempt: a restarted group never reads the dead attempt's keys.
    return dist.PrefixStore(f"pretrain/attempt_{env.restart_count}", tcp)


_EXIT_STORE: dist.Store | None = None
"""The store this process's group was built on (None in a world of one): ranks count themselves out on it."""
LEFT_KEY = "left_group"
EXIT_WAIT_S = 60.0


def shutdown(together: bool = True) -> None:
    """Leave the process group; after a finished run, wait (bounded) until every rank has left it.

    gloo closes its connections in ``destroy_process_group``. A rank that
    exits while a peer is still in there was seen to abort that peer after a
    finished, exported run ("terminate called without an active exception",
    exit -6, so the launcher reported a failure). So ranks leave together:
    each counts itself out on the store and waits for the rest. ``together``
    is False on an error path, where a peer may never arrive.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    dist.destroy_process_group()
    if together and _EXIT_STORE is not None:
        wait_for_all_to_leave(_EXIT_STORE, world, EXIT_WAIT_S)


def wait_for_all_to_leave(store: dist.Store, world_size: int, timeout_s: float) -> int:
    """Count this rank out on ``store`` and wait until ``world_size`` ranks have; returns how many had."""
    deadline = time.monotonic() + timeout_s
    try:
        left = int(store.add(LEFT_KEY, 1))
        while left < world_size and time.monotonic() < deadline:
            time.sleep(0.05)
            left = int(store.add(LEFT_KEY, 0))
    except (RuntimeError, dist.DistError) as err:
        # The store's host (rank 0 or torchrun's agent) is gone, which it only is once
        # every rank has counted itself out: nothing is left to wait for.
        log.debug("store closed while leaving the group: %s", err)
        return world_size
    if left < world_size:
        log.warning("left the process group after %.0f s with %d of %d ranks out", timeout_s, left, world_size)
    return left
