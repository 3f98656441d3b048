"""Pre-training a recurrent temporal core on a frozen image encoder.

Shape letters: the one glossary. Tensor names carry their shapes
(``tokens_BTND``, ``state_BNd``); a letter means the same thing in every file.

    B   clips in a batch
    T   frames of a clip
    S   source frames (the core's input, the memory)
    K   target frames per clip
    N   patch tokens per frame (grid_h * grid_w)
    V   visible tokens per target frame
    L   chosen encoder blocks (encoder.feature_layers)
    D   width of the frozen encoder's tokens
    d   trainable width (core.dim): the adapter's output, the cores, the predictor
    C   colour channels (3); H, W: pixels (height, width)
    h   attention heads; e = d / h head width
    Q   query length, M key/value length (attention blocks)
    U   B*K target frames batched as predictor queries; G memory tokens per clip
    P   B*N per-patch sequences (the Mamba scan runs over time per patch)
    F   B*T frames batched for per-frame spatial attention
    E   Mamba inner width (core.expand * d)
    Z   selective-scan state size per channel (core.d_state)
    J   causal conv width over time (core.d_conv)
    R   rank of Mamba's step-size projection (dt_rank)
    X   R + 2Z outputs of Mamba's x_proj

Kernels (``kernels/``) keep the lower-case letters of their reference papers
(b, d, n, l), documented in each kernel's module.
"""
