"""One rank of a distributed test, run under torchrun by ``test_distributed.py``; results go to JSON/pt files.

    torchrun ... tests/pretrain/dist_worker.py MODE OUT_DIR -- --section.key=value ...

Modes:
- ``train``: train to the end (with the fault hooks below), then save this
  rank's final weights and history.
- ``resume``: a straight run (with export), then a second run stopped at
  ``--stop-at`` and resumed from its checkpoint by a fresh Trainer.
- ``fixed``: every step each rank trains on its half of a union batch drawn
  from a seeded sampler (the gradient-averaging test).
- ``keys``: the sample keys this rank's shard loader yields in one epoch.

Fault hooks (environment): KILL_RANK_AT_STEP=r:s SIGKILLs rank r after step s
on the first attempt only; HANG_RANK=r makes rank r sleep instead of training;
READY_AT_STEP=s writes ``ready_rank{r}`` (with the pid) once step s is done.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from pretrain import distributed
from pretrain.config import load_config
from pretrain.data import ShardBatchSource
from pretrain.trainer import Trainer

UNION_SEED = 1234


def _hooks(trainer: Trainer, out: Path) -> None:
    original = trainer.train_step
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    kill = os.environ.get("KILL_RANK_AT_STEP")
    ready = os.environ.get("READY_AT_STEP")

    def step() -> dict[str, float]:
        metrics = original()
        done = trainer.state.step + 1
        if kill and restart == 0 and [trainer.rank, done] == [int(x) for x in kill.split(":")]:
            os.kill(os.getpid(), signal.SIGKILL)
        if ready and done == int(ready):
            (out / f"ready_rank{trainer.rank}").write_text(str(os.getpid()))
        return metrics

    trainer.train_step = step
    if os.environ.get("HANG_RANK") == str(trainer.rank):
        # Bounded: the peer's collective timeout (seconds) fires long before this ends.
        time.sleep(120)


def _dump(trainer: Trainer, out: Path, tag: str) -> None:
    params = {k: v.detach().float().cpu() for k, v in trainer.model.state_dict().items()}
    torch.save(params, out / f"{tag}_params_rank{trainer.rank}.pt")
    info = {
        "step": trainer.state.step,
        "history": trainer.state.history,
        "world_size": trainer.ctx.world_size,
        "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
    }
    (out / f"{tag}_rank{trainer.rank}.json").write_text(json.dumps(info))


def run_fixed(trainer: Trainer, steps: int) -> None:
    """Rank r trains on rows [r*m, (r+1)*m) of a union batch of world*m clips, the same on every rank.

    The union batches come from a one-rank batch source over the run's shards, seeded alike everywhere.
    """
    m, r, world = trainer.batch_plan.micro_batch_size, trainer.rank, trainer.ctx.world_size
    cfg = trainer.shards.cfg
    union_cfg = dataclasses.replace(
        cfg,
        run=dataclasses.replace(cfg.run, seed=UNION_SEED),
        train=dataclasses.replace(cfg.train, micro_batch_size=m * world, grad_accum=1, global_batch_size=0),
    )
    union = ShardBatchSource(union_cfg, rank=0, world_size=1, encoder_hash=trainer.encoder.weights_hash)
    trainer.sampler.next_batch = lambda n: union.next_batch(n * world).rows(r * m, (r + 1) * m)
    for _ in range(steps):
        trainer.train_step()
        trainer.state.step += 1


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("train", "resume", "fixed", "keys"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--stop-at", type=int, default=None)
    args, overrides = parser.parse_known_args()
    cfg = load_config("tiny-cpu", overrides)
    finished = False
    try:
        trainer = Trainer(cfg)
        if args.mode == "keys":
            keys = [k for batch in trainer.sampler.loader.iter_epoch() for k in batch.keys]
            (args.out / f"keys_rank{trainer.rank}.json").write_text(json.dumps(keys))
        elif args.mode == "fixed":
            run_fixed(trainer, cfg.train.steps)
            _dump(trainer, args.out, "fixed")
        elif args.mode == "resume":
            trainer.train()
            _dump(trainer, args.out, "straight")
            stopped_cfg = load_config("tiny-cpu", [*overrides, "--run.name=stopped"])
            Trainer(stopped_cfg).train(stop_at=args.stop_at)
            resumed = Trainer(stopped_cfg)
            resumed.train(finalize=False)
            _dump(resumed, args.out, "resumed")
        else:
            _hooks(trainer, args.out)
            trainer.train()
            _dump(trainer, args.out, "final")
        finished = True
    except distributed.CollectiveTimeoutError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    finally:
        distributed.shutdown(together=finished)
    return 0


if __name__ == "__main__":
    sys.exit(main())
