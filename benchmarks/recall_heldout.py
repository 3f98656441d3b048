"""Held-out recall: how well an export predicts a past source frame from the core's last state.

    python -m benchmarks.recall_heldout --config procedural-cpu --exports runs/A/export,runs/B/export
        [--recall 2,8,11] [--set objective.recall_offsets=[2,4,8,11]]

The trainer scores the recall offsets it trained with (offset -k: the source
frame k before the last) in its held-out table; this scores chosen k on the
config's data.eval_shards, with copy-last (the last source frame) as the
baseline, for several exports side by side, e.g. a core trained with
objective.recall_offsets beside its identity-core control: what the control
cannot recall, only memory can.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from eval.features import load_checked_encoder, read_export
from pretrain.config import load_config
from pretrain.data import eval_batches
from pretrain.features import FeatureSettings
from pretrain.objective import evaluate_batches


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recall_heldout", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="preset or TOML whose data.eval_shards are scored")
    parser.add_argument("--exports", required=True, help="comma-separated export directories")
    parser.add_argument("--recall", default="2,8,11", help="comma-separated k (frame S-1-k is the target)")
    parser.add_argument("--set", action="append", default=[], help="config override, as --section.key=value")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, [f"--{o.removeprefix('--')}" for o in args.set])
    settings = FeatureSettings.from_config(cfg)
    print("export | recall k | windows | model L1 | copy-last L1 | gain vs copy-last")
    for directory in args.exports.split(","):
        export = read_export(directory)
        encoder = load_checked_encoder(export)
        offsets = [-int(k) for k in args.recall.split(",")]
        batches = {o: eval_batches(cfg, encoder.weights_hash, o) for o in offsets}
        if export.spec.max_recall < max(-o for o in offsets):
            print(f"{directory} | skipped: built for recall up to k = {export.spec.max_recall}")
            continue
        with torch.no_grad():
            results = evaluate_batches(export.model, encoder, batches, settings)
        for r in sorted(results, key=lambda r: -r.offset):
            scores = f"{r.model_l1:.4f} | {r.copy_last_l1:.4f} | {100 * r.gain:+.1f}%"
            print(f"{directory} | {-r.offset} | {r.windows} | {scores}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
