"""Entry point: ``python -m pretrain.train --config PRESET_OR_TOML [--section.key=value ...]``.

Trains (resuming from the run directory's latest checkpoint when there is
one), evaluates held-out future-feature prediction against copy-last and the
untrained model, exports, and prints a short report.

The same command runs alone or under torchrun, the deepspeed launcher or SLURM
(``launchers/``): the launcher's RANK/WORLD_SIZE environment selects the
DeepSpeed engine (``pretrain.distributed``). Only rank 0 logs at INFO and
prints the report.
"""

from __future__ import annotations

import argparse
import logging
import sys

from data_shards import VideoDecodeError
from data_shards.io import OutputDirError
from pretrain import distributed
from pretrain.checkpoint import CheckpointError
from pretrain.config import Config, ConfigError, describe_config, field_docs, load_config
from pretrain.objective import HeldoutResult
from pretrain.trainer import NonFiniteLossError, StopFlag, Trainer, TrainResult

log = logging.getLogger("pretrain")

# Errors a user can fix from the message alone: one line, exit code 2.
USER_ERRORS = (
    ConfigError,
    FileNotFoundError,
    VideoDecodeError,
    CheckpointError,
    NonFiniteLossError,
    ValueError,
    OutputDirError,
)


def _l1_cell(result: HeldoutResult | None) -> str:
    """A 10-wide held-out L1 cell of the report table, "-" where that model was not evaluated."""
    return f"{result.model_l1:>10.4f}" if result is not None else f"{'-':>10}"


def _verdict(heldout: list, identity: dict) -> str:
    """Copy-last first, then the identity-core control: only a win over both is a temporal one.

    Future offsets only: a recall row (offset -k) answers another question, shown in the table.
    """
    heldout = [r for r in heldout if r.offset > 0]
    beaten = [r.offset for r in heldout if r.model_l1 < r.copy_last_l1]
    if not beaten:
        return "the pre-trained core does NOT beat copy-last on held-out frames (too little video to generalise)."
    vs_copy = "every offset" if len(beaten) == len(heldout) else f"offset(s) {beaten} only"
    if not identity:
        return f"the pre-trained core beats copy-last at {vs_copy} (no identity-core control was trained)."
    temporal = [r.offset for r in heldout if r.offset in identity and r.model_l1 < identity[r.offset].model_l1]
    if not temporal:
        return (
            f"the pre-trained core beats copy-last at {vs_copy}, but NOT the identity-core control: "
            "the gain is the predictor's, not the temporal core's."
        )
    return f"the pre-trained core beats copy-last at {vs_copy} and the identity-core control at offset(s) {temporal}."


RECALL_NOTE = "; offset -k: recall of the source frame k before the last"


def format_report(result: TrainResult) -> str:
    lines = [f"run: {result.run_dir}  (step {result.step})"]
    if result.stopped_early:
        if result.step == 0:
            lines.append("stopped before the first step; nothing was trained. Re-run the same command to start.")
        else:
            lines.append(f"stopped at step {result.step}; a checkpoint was written. Re-run the same command to resume.")
        return "\n".join(lines)
    if not result.heldout:
        lines += [
            "",
            "no held-out evaluation was run (no held-out data: set data.eval_shards, or train from data.videos).",
            f"export: {result.export_dir}",
            f"tracking: {result.tracking}",
        ]
        return "\n".join(lines)
    untrained = {r.offset: r for r in result.heldout_untrained}
    identity = {r.offset: r for r in result.identity.heldout} if result.identity else {}
    lines += [
        "",
        "held-out future-feature prediction, masked-token L1 vs layer-normed frozen features (lower is better)"
        + (RECALL_NOTE if any(r.offset < 0 for r in result.heldout) else ""),
        f"{'offset':>6} {'windows':>7} {'copy-last':>10} {'untrained':>10} {'identity':>10} {'pre-trained':>11} "
        f"{'vs copy-last':>12} {'vs identity':>11}",
    ]
    for r in result.heldout:
        u, i = untrained.get(r.offset), identity.get(r.offset)
        # A column with nothing to show (no identity-core control was trained) reads "-", not nan.
        vs_identity = f"{100 * (1 - r.model_l1 / i.model_l1):>+10.1f}%" if i else f"{'-':>11}"
        lines.append(
            f"{r.offset:>6} {r.windows:>7} {r.copy_last_l1:>10.4f} {_l1_cell(u)} {_l1_cell(i)} {r.model_l1:>11.4f} "
            f"{100 * r.gain:>+11.1f}% {vs_identity}"
        )
    verdict = _verdict(result.heldout, identity)
    lines += ["", f"finding: {verdict}", f"export: {result.export_dir}", f"tracking: {result.tracking}"]
    if result.tracking.startswith("MLflow"):
        uri = result.tracking.split(" in ", 1)[1]
        # The interpreter that ran training has mlflow, activated venv or not.
        lines.append(
            f"open the UI: {sys.executable} -m mlflow ui --backend-store-uri {uri}  (then http://127.0.0.1:5000)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    sections = "\n".join(f"  [{name}]  {doc}" for name, doc in field_docs(Config).items())
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.train",
        description="Pre-train a temporal module on a frozen image encoder.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Overrides: --section.key=value, e.g. --train.steps=100 --core.kind=mamba\n"
        f"Sections (--print-config lists every key with its value and meaning):\n{sections}",
    )
    parser.add_argument("--config", default="tiny-cpu", help="preset name in pretrain/configs or a TOML path")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (preset + overrides) as TOML with every key's docstring, and exit",
    )
    parser.add_argument("--log-level", default="INFO")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment carries the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    if args.print_config:
        try:
            print(describe_config(load_config(args.config, overrides)), end="")
        except (ConfigError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    env = distributed.launch_env()
    rank = env.rank if env else 0
    # Other ranks log warnings and errors only, each line tagged with its rank.
    level = args.log_level if rank == 0 else "WARNING"
    logging.basicConfig(level=level, format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    finished = False
    try:
        # SIGTERM is handled from here on: start-up (encoder loading, video encoding) included.
        with StopFlag() as stop:
            cfg = load_config(args.config, overrides)
            result = Trainer(cfg, stop=stop).train()
        finished = True
    except USER_ERRORS as err:
        # One line for the user; the traceback with --log-level DEBUG (a ValueError may also be a bug).
        log.debug("traceback of the error below", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except distributed.CollectiveTimeoutError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    finally:
        distributed.shutdown(together=finished)
    if rank == 0:
        print(format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
