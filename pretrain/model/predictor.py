"""The trainable part of the model: input adapter, temporal core, predictor.

Shape letters follow the glossary in ``pretrain/__init__.py``: B clips, S
source frames, K target frames per clip, N patch tokens per frame, V visible
tokens per target frame, L chosen encoder blocks, D frozen encoder width, d
trainable width, U = B*K target frames batched as queries, G memory tokens per
clip (S*N, or N with memory="last").

The core reads adapted source tokens and its outputs at every source step are
the memory. Each target frame is a set of N queries: a mask token (or the
adapted visible token where a patch is visible) plus a 2-D position, a
time-offset embedding (a recall embedding for a past source frame,
objective.recall_offsets) and the adapted token of the last source frame at
the same position. The predictor (self-attention over a frame's queries,
cross-attention to the memory, MLP) outputs features in the frozen encoder's
layer-normed space. With ``residual`` it outputs a change from the last source
frame's layer-normed token through a zero-initialized head, so an untrained
model is exactly the copy-last-frame baseline.

With ``feature_layers`` (encoder.feature_layers) the core's source input is
the mean of several encoder blocks through trainable per-block adapters
(``LayerAdapters``, part of this model: trained, checkpointed, exported);
visible target tokens, targets and the copy-last base stay final-block.

``ModelSpec`` (declared in ``pretrain.model.spec``, with the core and
predictor settings nested in it) is re-exported here with ``spec_from_config``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.model.blocks import PREDICTOR_ATTENTION_NAMES, PREDICTOR_MLP_NAMES, Attention, Mlp
from pretrain.model.cores import build_core
from pretrain.model.layer_adapters import LayerAdapters
from pretrain.model.spec import ModelSpec

if TYPE_CHECKING:
    from pretrain.config import Config

__all__ = ["FuturePredictor", "ModelSpec", "PredictorLayer", "count_parameters", "sincos_2d", "spec_from_config"]


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> Tensor:
    """Fixed 2-D sine-cosine position embedding, (grid_h*grid_w, dim), row-major."""
    if dim % 4 != 0:
        raise ValueError(f"position embedding dim must be divisible by 4, got {dim}")
    quarter = dim // 4
    freqs = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float32), torch.arange(grid_w, dtype=torch.float32), indexing="ij"
    )
    angle_y = ys.reshape(-1, 1) * freqs
    angle_x = xs.reshape(-1, 1) * freqs
    return torch.cat([angle_y.sin(), angle_y.cos(), angle_x.sin(), angle_x.cos()], dim=1)


class PredictorLayer(nn.Module):
    """Self-attention over a frame's queries, cross-attention to the memory, MLP (pre-norm)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads, PREDICTOR_ATTENTION_NAMES)
        self.norm_cross = nn.LayerNorm(dim)
        self.norm_memory = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, num_heads, PREDICTOR_ATTENTION_NAMES)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), PREDICTOR_MLP_NAMES)

    def forward(self, q_UNd: Tensor, memory_UGd: Tensor) -> Tensor:
        x_UNd = self.norm_self(q_UNd)
        q_UNd = q_UNd + self.self_attn(x_UNd, x_UNd)
        q_UNd = q_UNd + self.cross_attn(self.norm_cross(q_UNd), self.norm_memory(memory_UGd))
        return q_UNd + self.mlp(self.norm_mlp(q_UNd))


class FuturePredictor(nn.Module):
    """Adapter + temporal core + cross-attention predictor: all trainable parameters."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        core, predictor = spec.core, spec.predictor
        D, d = spec.encoder_dim, core.dim
        self.layer_adapters = LayerAdapters(spec.feature_layers, D) if spec.feature_layers else None
        self.adapter = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, d))
        self.core = build_core(
            core.kind,
            d,
            depth=core.depth,
            num_heads=core.num_heads,
            mlp_ratio=core.mlp_ratio,
            d_state=core.d_state,
            d_conv=core.d_conv,
            expand=core.expand,
        )
        self.source_time_embed = nn.Parameter(torch.zeros(spec.max_source_frames, d))
        self.offset_embed = nn.Embedding(spec.max_offset + 1, d)
        # Only built with recall, so exports without it keep their parameters.
        self.recall_embed = nn.Embedding(spec.max_recall + 1, d) if spec.max_recall else None
        self.mask_token = nn.Parameter(torch.zeros(d))
        self.register_buffer("pos_Nd", sincos_2d(spec.grid_h, spec.grid_w, d), persistent=False)
        self.layers = nn.ModuleList(
            PredictorLayer(d, predictor.num_heads, predictor.mlp_ratio) for _ in range(predictor.depth)
        )
        self.head_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, D)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.source_time_embed, std=0.02)
        nn.init.normal_(self.offset_embed.weight, std=0.02)
        if self.recall_embed is not None:
            nn.init.normal_(self.recall_embed.weight, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        if self.spec.predictor.residual:
            # Zero head: the untrained model predicts the last source frame (copy-last).
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    @property
    def num_tokens(self) -> int:
        return self.spec.num_tokens

    def source_features(self, source_BSND: Tensor, source_layers_BSLND: Tensor | None = None) -> Tensor:
        """The core's input tokens before the adapter, (B, S, N, D).

        The final-block tokens, or with feature_layers the adapted mean of the
        chosen blocks (required then: final-block tokens alone would silently
        feed the core a feature it was not trained on).
        """
        if self.layer_adapters is None:
            return source_BSND
        L = len(self.spec.feature_layers)
        if source_layers_BSLND is None or source_layers_BSLND.shape[2] != L:
            got = None if source_layers_BSLND is None else tuple(source_layers_BSLND.shape)
            raise ValueError(
                f"model trained with encoder.feature_layers={self.spec.feature_layers} needs source blocks "
                f"(B, S, {L}, N, D), got {got}"
            )
        return self.layer_adapters(source_layers_BSLND.unbind(dim=2))

    def memory(self, source_BSND: Tensor, source_layers_BSLND: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Run the core over the source frames: (adapted tokens, memory), both (B, S, N, d)."""
        S = source_BSND.shape[1]
        if self.spec.max_source_frames < S:
            raise ValueError(f"{S} source frames exceed max_source_frames={self.spec.max_source_frames}")
        x_BSNd = self.adapter(self.source_features(source_BSND, source_layers_BSLND))
        memory_BSNd, _ = self.core(x_BSNd)
        # Time embedding counts back from the last source frame so any S <= max works.
        time_Sd = self.source_time_embed[:S].flip(0)
        return x_BSNd, memory_BSNd + time_Sd[None, :, None, :]

    def _check_offsets(self, offsets_BK: Tensor) -> None:
        """Future offsets in [1, max_offset]; recall offsets (negative) in [-max_recall, -1]."""
        spec = self.spec
        future = offsets_BK[offsets_BK > 0]
        recall = -offsets_BK[offsets_BK <= 0]
        if len(future) and future.max() > spec.max_offset:
            raise ValueError(f"target offsets must be in [1, {spec.max_offset}], got {future.max().item()}")
        if len(recall) and (recall.min() < 1 or recall.max() > spec.max_recall):
            allowed = f"[-{spec.max_recall}, -1]" if spec.max_recall else "none (the model was built without recall)"
            raise ValueError(f"recall offsets (target offsets <= 0) must be in {allowed}, got {-recall.max().item()}")

    def offset_embedding(self, offsets_BK: Tensor) -> Tensor:
        """(B, K, d): the future offset's embedding, or the recall embedding of -offset for a past frame."""
        future_BKd = self.offset_embed(offsets_BK.clamp(min=0))
        if self.recall_embed is None:
            return future_BKd
        recall_BKd = self.recall_embed((-offsets_BK).clamp(min=0))
        return torch.where((offsets_BK < 0)[..., None], recall_BKd, future_BKd)

    def forward(
        self,
        source_BSND: Tensor,
        offsets_BK: Tensor,
        visible_idx_BKV: Tensor,
        visible_tokens_BKVD: Tensor,
        source_layers_BSLND: Tensor | None = None,
    ) -> Tensor:
        """Predict layer-normed frozen features of K target frames, (B, K, N, D).

        ``source_layers_BSLND``: the feature_layers blocks of the source frames (required with feature_layers).
        """
        B, S, N, D = source_BSND.shape
        K = offsets_BK.shape[1]
        if self.num_tokens != N:
            raise ValueError(f"got {N} tokens per frame, model built for {self.num_tokens}")
        self._check_offsets(offsets_BK)
        x_BSNd, memory_BSNd = self.memory(source_BSND, source_layers_BSLND)
        d = x_BSNd.shape[-1]
        if self.spec.memory == "last":
            # Only the core's current state: what the past left in it is all the predictor can use.
            memory_BSNd = memory_BSNd[:, -1:]
            S = 1

        queries_BKNd = self.mask_token.expand(B, K, N, d).clone()
        if visible_idx_BKV.shape[-1] > 0:
            visible_BKVd = self.adapter(visible_tokens_BKVD)
            index_BKVd = visible_idx_BKV.unsqueeze(-1).expand(-1, -1, -1, d)
            shown_BKNd = queries_BKNd.scatter(2, index_BKVd, visible_BKVd)
            # A recalled past frame shows nothing of itself: a few of its tokens would give away what the
            # state was asked to keep (a whole-frame event is in every patch), so recall rows stay masked.
            recall_BK11 = (offsets_BK < 0)[:, :, None, None]
            queries_BKNd = torch.where(recall_BK11, queries_BKNd, shown_BKNd)
        queries_BKNd = queries_BKNd + self.pos_Nd + self.offset_embedding(offsets_BK)[:, :, None, :] + x_BSNd[:, -1:]

        q_UNd = queries_BKNd.reshape(B * K, N, d)
        memory_UGd = memory_BSNd.reshape(B, 1, S * N, d).expand(B, K, S * N, d).reshape(B * K, S * N, d)
        for layer in self.layers:
            q_UNd = layer(q_UNd, memory_UGd)
        delta_BKND = self.head(self.head_norm(q_UNd)).view(B, K, N, D)
        if not self.spec.predictor.residual:
            return delta_BKND
        base_BND = F.layer_norm(source_BSND[:, -1].float(), (D,)).to(delta_BKND.dtype)
        return base_BND[:, None] + delta_BKND


def spec_from_config(cfg: Config, encoder_dim: int, grid_h: int, grid_w: int) -> ModelSpec:
    """The model spec of a typed config (``pretrain.config.Config``) on an encoder of this width and grid.

    The core and predictor sections are carried as they are (copies, so the
    spec does not alias the config); the rest is derived from the objective
    and encoder sections.
    """
    return ModelSpec(
        encoder_dim=encoder_dim,
        grid_h=grid_h,
        grid_w=grid_w,
        core=dataclasses.replace(cfg.core),
        predictor=dataclasses.replace(cfg.predictor),
        max_source_frames=cfg.objective.source_frames,
        max_offset=max(cfg.objective.target_offsets),
        feature_layers=list(cfg.encoder.feature_layers),
        memory=cfg.objective.memory,
        max_recall=max(cfg.objective.recall_offsets, default=0),
    )


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
