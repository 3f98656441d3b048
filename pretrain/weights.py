"""Compatibility path of ``pretrain.encoder.weights`` (the weight loaders now live in the encoder package).

Kept for ``python -m pretrain.weights import-onnx [--onnx PATH] [--out DIR]``
and for code that imports ``pretrain.weights``; new code imports
``pretrain.encoder.weights``.
"""

import sys

from pretrain.encoder import weights as _weights
from pretrain.encoder.weights import *  # noqa: F403  (re-exports exactly the encoder module's __all__)

__all__ = list(_weights.__all__)

if __name__ == "__main__":
    sys.exit(_weights.main())
