"""Entry point: ``python -m pretrain.encode --config PRESET_OR_TOML [--section.key=value ...] --shards IN --out OUT``.

One frozen-encoder pass over clip shards into feature shards
(``data_shards.features.encode_clip_shards``; the layout is in its module
docstring), with the encoder a training run of the same config loads. The
config decides every encoder setting: [encoder] source, arch, image_size,
feature_layers (blocks stored besides the final one), chunk_frames,
attn_backend and compile; objective.visible_fraction (visible sets stored per
frame; 0 = none); run.seed (for encoder.source='random') and run.device.
Training from the output under the same config passes its start-up check
(``pretrain.data.check_feature_shards``); a config whose encoder
settings differ is refused there, naming the key.

Before the first clip, one line on stderr with the storage estimate (feature
bytes per frame, and for the corpus when the clip manifest gives its frame
count), then a progress bar over clips on stderr (--no-progress: none).
Prints the feature directory (OUT/<weights hash[:16]>/) on stdout, alone, so
a script can capture it. Exit codes: 0 done;
2 a request that cannot be carried out as asked (a bad config, override or
argument, missing weights, an output directory that would lose files,
unreadable clip shards, another encoder's or other settings' features in the
way), reported as one ``error:`` line on stderr with nothing written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from data_shards.features import EncodePlan, check_feature_root, encode_clip_shards
from pretrain.config import Config, ConfigError, config_to_dict, load_config
from pretrain.distributed import resolve_device
from pretrain.encoder import check_feature_layers, encoder_settings, load_encoder_from_config

log = logging.getLogger("pretrain.encode")

# Requests that cannot be carried out as asked; each message names the key or the path.
# ValueError covers ConfigError, ClipShardError, EncoderMismatchError and OutputDirError.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)


def encode(
    cfg: Config,
    shards: str | Path,
    out: str | Path,
    *,
    batch_clips: int = 8,
    visible_sets: int = 2,
    expected_encoder_hash: str | None = None,
    args: dict[str, Any] | None = None,
    on_start: Callable[[EncodePlan], None] | None = None,
    on_clip: Callable[[int], None] | None = None,
) -> Path:
    """Encode the clip shards in ``shards`` into ``out/<hash[:16]>/`` with ``cfg``'s encoder; returns that directory.

    ``batch_clips`` clips per encoder call; ``visible_sets`` sets per frame
    when objective.visible_fraction > 0. ``args`` (what the command line was
    asked) is recorded in the manifest with the resolved encoder section.
    ``on_start`` / ``on_clip``: progress callbacks of ``encode_clip_shards``.
    Raises ConfigError for feature_layers outside the loaded encoder's
    blocks, and whatever ``encode_clip_shards`` refuses.
    """
    # Before loading weights: a refused OUT fails at once.
    check_feature_root(out)
    device = resolve_device(cfg, 0)
    encoder = load_encoder_from_config(cfg, device)
    try:
        check_feature_layers(cfg.encoder.feature_layers, encoder.depth)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    # The settings the training run's start-up check will compare the output against.
    settings = encoder_settings(cfg, encoder.weights_hash)
    recorded_args = {
        **(args or {}),
        "batch": batch_clips,
        "visible_sets": visible_sets,
        "device": str(device),
        "seed": cfg.run.seed,
        "encoder": config_to_dict(cfg.encoder),
    }
    return encode_clip_shards(
        shards,
        out,
        encoder,
        batch_clips=batch_clips,
        visible_fraction=settings["visible_fraction"],
        visible_sets=visible_sets,
        feature_layers=settings["feature_layers"],
        expected_encoder_hash=expected_encoder_hash,
        args=recorded_args,
        on_start=on_start,
        on_clip=on_clip,
    )


def _decimal_bytes(n: float) -> str:
    """1 kB = 1000 B, as storage is sold and ``df -H`` counts."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def storage_estimate_line(plan: EncodePlan) -> str:
    """The line printed before encoding: feature bytes per frame, and for the whole corpus when it is known.

    Tensor bytes only (``feature_bytes_per_frame``): each clip adds a few KB
    of headers and json on top.
    """
    per_frame = f"{plan.bytes_per_frame:,} B ({_decimal_bytes(plan.bytes_per_frame)}) of features per frame"
    if plan.clips is None:
        return f"storage estimate: {per_frame}; corpus total unknown (no clip manifest with per-shard sample counts)"
    if plan.total_bytes is None:
        return f"storage estimate: {per_frame}; corpus total unknown ({plan.clips:,} clips, no args.clip_frames)"
    frames = f"{plan.clips:,} clips x {plan.clip_frames:,} frames = {plan.frames:,} frames"
    return f"storage estimate: {per_frame}; {frames} -> about {_decimal_bytes(plan.total_bytes)}"


class EncodeProgress:
    """The command's feedback, on stderr since stdout carries only the result: the estimate line, then a bar over clips.

    ``start`` and ``clip`` are ``encode``'s ``on_start`` and ``on_clip``;
    ``close`` ends the bar (call it in a ``finally``).
    """

    def __init__(self, *, bar: bool = True, stream: TextIO | None = None) -> None:
        self.show_bar = bar
        # Looked up now, not at import: pytest's capture and redirect_stderr replace sys.stderr.
        self.stream = stream if stream is not None else sys.stderr
        self.bar: tqdm | None = None
        self.frames = 0

    def start(self, plan: EncodePlan) -> None:
        print(storage_estimate_line(plan), file=self.stream, flush=True)
        if self.show_bar:
            # Redirected output (CI, SLURM logs) gets an update every 30 s, as the trainer's bar does.
            interval = 0.1 if self.stream.isatty() else 30.0
            self.bar = tqdm(
                total=plan.clips, desc="encode", unit="clip", file=self.stream, dynamic_ncols=True, mininterval=interval
            )

    def clip(self, frames: int) -> None:
        self.frames += frames
        if self.bar is not None:
            self.bar.update(1)
            # Clips differ in length, so clips/s alone hides the encoder's throughput; shown at the next refresh.
            elapsed = self.bar.format_dict["elapsed"]
            if elapsed > 0:
                self.bar.set_postfix_str(f"{self.frames / elapsed:.1f} frames/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.encode",
        description="Clip shards -> feature shards of frozen-encoder tokens (bf16), with the encoder of a config.",
        epilog="Overrides: --section.key=value, e.g. --encoder.image_size=112 --objective.visible_fraction=0",
    )
    parser.add_argument("--config", required=True, help="preset name in pretrain/configs or a TOML path")
    parser.add_argument(
        "--shards",
        required=True,
        help="clip shards: a directory (clips-*.tar + manifest.json), a URL pattern "
        "(https://host/clips-{000000..000099}.tar), a pipe: command, an fsspec URL or @LIST_FILE",
    )
    parser.add_argument(
        "--out", required=True, help="output root, a local directory only; features go to OUT/<encoder hash[:16]>/"
    )
    parser.add_argument("--batch", type=int, default=8, help="clips per encoder call")
    parser.add_argument(
        "--visible-sets", type=int, default=2, help="visible sets stored per frame (objective.visible_fraction > 0)"
    )
    parser.add_argument("--expect-hash", default=None, help="fail unless the encoder's weights hash is this")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--log-level", default="WARNING", help="INFO logs the encoder and each shard encoded")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    progress = EncodeProgress(bar=not args.no_progress)
    try:
        cfg = load_config(args.config, overrides)
        out = encode(
            cfg,
            args.shards,
            args.out,
            batch_clips=args.batch,
            visible_sets=args.visible_sets,
            expected_encoder_hash=args.expect_hash,
            args={"config": args.config, "overrides": overrides, "shards": args.shards, "out": args.out},
            on_start=progress.start,
            on_clip=progress.clip,
        )
    except USER_ERRORS as err:
        # One line for the user; the traceback with --log-level DEBUG (a ValueError may also be a bug).
        log.debug("traceback of the error below", exc_info=True)
        # End a bar mid-line first, so the error stays one line of its own.
        progress.close()
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        progress.close()
    # The command's result, for scripts: the directory to pass as data.shards.
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
