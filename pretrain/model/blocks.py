"""The attention and MLP blocks shared by the temporal cores and the predictor.

Shape letters: see the glossary in ``pretrain/__init__.py`` (B batch, Q query
length, M key/value length, d width, h heads, e = d / h head width).

Parameter names are part of every checkpoint and export written so far: the
cores' layers call their linears ``q_proj``/``kv_proj``/``out_proj`` and
``fc1``/``fc2``, the predictor's ``q``/``kv``/``proj`` and ``0``/``2`` (an
``nn.Sequential``'s indices). One class each takes the names as an argument,
so both keep their state-dict keys; the math and the order in which parameters
are created (hence the seeded initialization) are the same for both.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

CORE_ATTENTION_NAMES = ("q_proj", "kv_proj", "out_proj")
PREDICTOR_ATTENTION_NAMES = ("q", "kv", "proj")
CORE_MLP_NAMES = ("fc1", "fc2")
PREDICTOR_MLP_NAMES = ("0", "2")


class Attention(nn.Module):
    """Multi-head attention through SDPA; self-attention when no context is given.

    q = x Wq, [k, v] = context Wkv (k: the first d outputs, v: the last d), per
    head softmax(q k^T / sqrt(e)) v, then the output projection.
    """

    def __init__(self, dim: int, num_heads: int, names: tuple[str, str, str] = CORE_ATTENTION_NAMES) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        self.num_heads = num_heads
        self.names = names
        q_name, kv_name, out_name = names
        self.add_module(q_name, nn.Linear(dim, dim))
        self.add_module(kv_name, nn.Linear(dim, 2 * dim))
        self.add_module(out_name, nn.Linear(dim, dim))

    def forward(self, x_BQd: Tensor, context_BMd: Tensor | None = None) -> Tensor:
        if context_BMd is None:
            context_BMd = x_BQd
        q_lin, kv_lin, out_lin = (getattr(self, name) for name in self.names)
        B, Q, d = x_BQd.shape
        M = context_BMd.shape[1]
        h = self.num_heads
        q_BhQe = q_lin(x_BQd).view(B, Q, h, d // h).transpose(1, 2)
        kv_BM2he = kv_lin(context_BMd).view(B, M, 2, h, d // h)
        k_BhMe = kv_BM2he[:, :, 0].transpose(1, 2)
        v_BhMe = kv_BM2he[:, :, 1].transpose(1, 2)
        o_BhQe = F.scaled_dot_product_attention(q_BhQe, k_BhMe, v_BhMe)
        return out_lin(o_BhQe.transpose(1, 2).reshape(B, Q, d))


class Mlp(nn.Module):
    """Linear d -> hidden, GELU, linear hidden -> d."""

    def __init__(self, dim: int, hidden: int, names: tuple[str, str] = CORE_MLP_NAMES) -> None:
        super().__init__()
        self.names = names
        self.add_module(names[0], nn.Linear(dim, hidden))
        self.add_module(names[1], nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        fc1, fc2 = (getattr(self, name) for name in self.names)
        return fc2(F.gelu(fc1(x)))
