"""Encoder settings: what an encode pass fixes about feature shards, and the one comparison against a config.

The tokens in feature shards depend on four settings: the encoder's weights
(their hash), the image size frames were resized to, the encoder blocks
stored besides the final one (``encoder.feature_layers``) and the fraction of
patches in the visible sets encoded from target patches alone
(``objective.visible_fraction``). ``encoder_settings`` gives them for a
config and the hash of the encoder it loaded; the encode pass
(``python -m pretrain.encode``) runs with exactly these, and its manifest
records them; ``recorded_encoder_settings`` reads them back from a feature
manifest; ``compare_encoder_settings`` names the ones that differ. Training
from feature shards refuses shards its config would not have produced
(``pretrain.data.check_feature_shards``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pretrain.config import Config

SETTING_CONFIG_KEYS = {
    "weights_hash": "encoder.source",
    "image_size": "encoder.image_size",
    "feature_layers": "encoder.feature_layers",
    "visible_fraction": "objective.visible_fraction",
}
"""Each encoder setting, and the config key that decides it (the weights hash: the weights that
encoder.source, with encoder.arch, names)."""

# Settings a config can leave empty (no blocks, no visible sets) to accept any stored value:
# stored blocks and visible sets it does not read are ignored.
_EMPTY_ACCEPTS_ANY = ("feature_layers", "visible_fraction")

# How a mismatch reads after "but the feature shards in DIR ...".
_RECORDED_AS = {
    "weights_hash": "were encoded by weights hash {}",
    "image_size": "were encoded at image size {}",
    "feature_layers": "store blocks {}",
    "visible_fraction": "carry visible sets of fraction {}",
}
_ALTERNATIVES = {
    "feature_layers": "train from clips",
    "visible_fraction": "set objective.visible_fraction=0 for pure forecasting",
}


def check_feature_layers(layers: Sequence[int], depth: int) -> None:
    """encoder.feature_layers must be distinct block indices in [0, depth); ValueError naming the key."""
    if len(set(layers)) != len(layers) or any(i < 0 or i >= depth for i in layers):
        raise ValueError(
            f"config key 'encoder.feature_layers': {list(layers)} must be distinct block indices in "
            f"[0, {depth}) for the loaded encoder ({depth} blocks)"
        )


def encoder_settings(cfg: Config, weights_hash: str) -> dict[str, Any]:
    """The encoder settings of ``cfg`` with the loaded encoder's ``weights_hash`` (keys: SETTING_CONFIG_KEYS)."""
    return {
        "weights_hash": weights_hash,
        "image_size": cfg.encoder.image_size,
        "feature_layers": [int(i) for i in cfg.encoder.feature_layers],
        "visible_fraction": float(cfg.objective.visible_fraction),
    }


def recorded_encoder_settings(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The encoder settings a feature-shard manifest (``data_shards.features``) records.

    Shards without visible sets record a fraction of 0 whatever the pass was asked.
    """
    encoder = manifest.get("encoder") or {}
    with_sets = bool(manifest.get("visible_sets", 0))
    return {
        "weights_hash": encoder.get("weights_hash"),
        "image_size": manifest.get("image_size"),
        "feature_layers": [int(i) for i in manifest.get("feature_layers") or []],
        "visible_fraction": float(manifest.get("visible_fraction", 0.0)) if with_sets else 0.0,
    }


def compare_encoder_settings(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The settings (keys of SETTING_CONFIG_KEYS) in which ``recorded`` differs from what ``current`` asks.

    An empty ``feature_layers`` or a zero ``visible_fraction`` in ``current``
    asks for nothing and accepts any recorded value; fractions compare within
    float rounding.
    """
    differing = []
    for key in SETTING_CONFIG_KEYS:
        want, have = current[key], recorded.get(key)
        if key in _EMPTY_ACCEPTS_ANY and not want:
            continue
        if key == "visible_fraction":
            same = have is not None and math.isclose(have, want, rel_tol=1e-9, abs_tol=1e-12)
        else:
            same = have == want
        if not same:
            differing.append(key)
    return differing


def describe_settings_mismatch(
    differing: Sequence[str], recorded: Mapping[str, Any], current: Mapping[str, Any], shards: str | Path
) -> str:
    """One message naming each differing setting's config key, the configured and the recorded value, and the fix."""
    clauses = [
        f"config key '{SETTING_CONFIG_KEYS[key]}': {current[key]}, but the feature shards in {shards} "
        + _RECORDED_AS[key].format(recorded.get(key))
        for key in differing
    ]
    alternatives = [_ALTERNATIVES[key] for key in differing if key in _ALTERNATIVES]
    fix = (
        "re-encode the clip shards under this config (python -m pretrain.encode --config PRESET_OR_TOML "
        "[--section.key=value ...] --shards CLIPS --out OUT)"
    )
    return "; ".join(clauses) + f" ({' or '.join([fix, *alternatives])})"
