"""Small task readouts over core features, after the paper and 4DS.

Shape legend: B clips, T frames, N = G*G patch tokens per frame (G the patch
grid side), d feature width, Q query points or objects, C classes, U = G*up
output pixels per side of a dense map, 2 = (x, y), 4 = box (x0, y0, x1, y1).

Positions are normalized to [0, 1] of the frame (x right, y down); patch n
(row i, column j, row-major) is centred at ((j + 0.5) / G, (i + 0.5) / G).
Core outputs are unnormalized residual streams, so every readout starts
with its own LayerNorm. Heads are per-frame where the task is per-frame:
whatever a readout needs from the past must come through the core.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def patch_centers(grid: int) -> Tensor:
    """Normalized (x, y) centres of the patches, (N, 2), row-major."""
    coords = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)


def sample_at(features_BNd: Tensor, points_BQ2: Tensor, grid: int) -> Tensor:
    """Bilinear feature at normalized points, (B, Q, d); patch centres are the sample grid."""
    B, _, d = features_BNd.shape
    map_BdGG = features_BNd.transpose(1, 2).reshape(B, d, grid, grid)
    # align_corners=False puts -1 and 1 at the frame edges, so patch centres land on samples.
    sampled_BdQ1 = F.grid_sample(map_BdGG, (2 * points_BQ2 - 1)[:, :, None, :], align_corners=False)
    return sampled_BdQ1[..., 0].transpose(1, 2)


def box_patch_weights(boxes_BQ4: Tensor, grid: int) -> Tensor:
    """Share of each patch covered by each box, normalized over patches, (B, Q, N)."""
    edges = torch.arange(grid + 1, dtype=torch.float32, device=boxes_BQ4.device) / grid
    lo, hi = edges[:-1], edges[1:]

    def overlap(a_BQ: Tensor, b_BQ: Tensor) -> Tensor:
        return (torch.minimum(b_BQ[..., None], hi) - torch.maximum(a_BQ[..., None], lo)).clamp(min=0)

    wx_BQG = overlap(boxes_BQ4[..., 0], boxes_BQ4[..., 2])
    wy_BQG = overlap(boxes_BQ4[..., 1], boxes_BQ4[..., 3])
    weights_BQN = (wy_BQG[..., :, None] * wx_BQG[..., None, :]).flatten(-2)
    return weights_BQN / weights_BQN.sum(-1, keepdim=True).clamp(min=1e-8)


class AttentiveProbe(nn.Module):
    """Learned queries cross-attend to the tokens, with a temporal position embedding -> class logits.

    ``last_frame_only`` (the streaming protocol) reads the N tokens of the
    last frame: the prediction is made online at the end of the clip, so
    anything about motion must come from the core's state. Otherwise the
    probe reads all T*N tokens.
    """

    def __init__(
        self, dim: int, frames: int, num_classes: int, *, num_queries: int = 4, heads: int = 4, last_frame_only: bool
    ) -> None:
        super().__init__()
        self.last_frame_only = last_frame_only
        self.norm = nn.LayerNorm(dim)
        self.time_embed_Td = nn.Parameter(torch.randn(frames, dim) * 0.02)
        self.queries_Qd = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, features_BTNd: Tensor) -> Tensor:
        """Logits (B, C)."""
        T = features_BTNd.shape[1]
        time_Td = self.time_embed_Td[:T]
        if self.last_frame_only:
            # Slice before the per-token norm: the same numbers for 1/T of the work.
            features_BTNd, time_Td = features_BTNd[:, -1:], time_Td[-1:]
        x_BTNd = self.norm(features_BTNd) + time_Td[:, None, :]
        tokens_BMd = x_BTNd.flatten(1, 2)
        queries_BQd = self.queries_Qd.expand(tokens_BMd.shape[0], -1, -1)
        pooled_BQd, _ = self.attn(queries_BQd, tokens_BMd, tokens_BMd, need_weights=False)
        return self.head(pooled_BQd.mean(1))


class DenseDepthHead(nn.Module):
    """Per-patch MLP to an up x up block of log-depth, pixel-shuffled into a (U, U) map per frame."""

    def __init__(self, dim: int, grid: int, *, up: int = 4, hidden: int = 128, init_depth: float = 6.0) -> None:
        super().__init__()
        self.grid, self.up = grid, up
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, up * up))
        nn.init.constant_(self.mlp[-1].bias, math.log(init_depth))

    def forward(self, features_BTNd: Tensor) -> Tensor:
        """Log-depth (B, T, U, U)."""
        B, T = features_BTNd.shape[:2]
        G, u = self.grid, self.up
        blocks = self.mlp(features_BTNd).view(B, T, G, G, u, u)
        return blocks.permute(0, 1, 2, 4, 3, 5).reshape(B, T, G * u, G * u)


class Correlation(nn.Module):
    """Query vectors against every frame's patches: soft-argmax position and the attended feature."""

    def __init__(self, dim: int, grid: int, width: int = 64) -> None:
        super().__init__()
        self.key = nn.Linear(dim, width)
        self.value = nn.Linear(dim, width)
        self.log_scale = nn.Parameter(torch.tensor(math.log(width**-0.5 * 4)))
        self.register_buffer("centers_N2", patch_centers(grid), persistent=False)

    def forward(self, queries_BQe: Tensor, features_BTNd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(positions (B, T, Q, 2), attended values (B, T, Q, e), peak logit (B, T, Q, 1))."""
        keys_BTNe = self.key(features_BTNd)
        logits_BTQN = torch.einsum("bqe,btne->btqn", queries_BQe, keys_BTNe) * self.log_scale.exp()
        attn_BTQN = logits_BTQN.softmax(-1)
        positions_BTQ2 = attn_BTQN @ self.centers_N2
        attended_BTQe = attn_BTQN @ self.value(features_BTNd)
        return positions_BTQ2, attended_BTQe, logits_BTQN.amax(-1, keepdim=True)


class PointTrackHead(nn.Module):
    """Query-point feature (frame 0, bilinear) against per-frame features -> position and visibility."""

    def __init__(self, dim: int, grid: int, width: int = 64) -> None:
        super().__init__()
        self.grid = grid
        self.norm = nn.LayerNorm(dim)
        self.query = nn.Linear(dim, width)
        self.correlation = Correlation(dim, grid, width)
        self.visibility = nn.Sequential(nn.Linear(2 * width + 1, width), nn.GELU(), nn.Linear(width, 1))

    def forward(self, features_BTNd: Tensor, queries_BQ2: Tensor) -> tuple[Tensor, Tensor]:
        """(positions (B, Q, T, 2) normalized, visibility logits (B, Q, T))."""
        f_BTNd = self.norm(features_BTNd)
        q_BQe = self.query(sample_at(f_BTNd[:, 0], queries_BQ2, self.grid))
        positions_BTQ2, attended_BTQe, peak_BTQ1 = self.correlation(q_BQe, f_BTNd)
        T = f_BTNd.shape[1]
        q_BTQe = q_BQe[:, None].expand(-1, T, -1, -1)
        visible_BTQ = self.visibility(torch.cat([q_BTQe, attended_BTQe, peak_BTQ1], dim=-1))[..., 0]
        return positions_BTQ2.transpose(1, 2), visible_BTQ.transpose(1, 2)


class BoxTrackHead(nn.Module):
    """Query from the first-frame box (pooled feature + box embedding) -> a box in every frame."""

    def __init__(self, dim: int, grid: int, width: int = 64) -> None:
        super().__init__()
        self.grid = grid
        self.norm = nn.LayerNorm(dim)
        self.query = nn.Sequential(nn.Linear(dim + 4, width), nn.GELU(), nn.Linear(width, width))
        self.correlation = Correlation(dim, grid, width)
        # Centre refinement (dx, dy) and size (w, h) from the query and what it found.
        self.box = nn.Sequential(nn.Linear(2 * width, width), nn.GELU(), nn.Linear(width, 4))

    def forward(self, features_BTNd: Tensor, query_boxes_BQ4: Tensor) -> Tensor:
        """Boxes (B, Q, T, 4), normalized (x0, y0, x1, y1) clamped to the frame."""
        f_BTNd = self.norm(features_BTNd)
        pooled_BQd = box_patch_weights(query_boxes_BQ4, self.grid) @ f_BTNd[:, 0]
        q_BQe = self.query(torch.cat([pooled_BQd, query_boxes_BQ4], dim=-1))
        centers_BTQ2, attended_BTQe, _ = self.correlation(q_BQe, f_BTNd)
        T = f_BTNd.shape[1]
        out_BTQ4 = self.box(torch.cat([q_BQe[:, None].expand(-1, T, -1, -1), attended_BTQe], dim=-1))
        centers_BTQ2 = centers_BTQ2 + 0.1 * torch.tanh(out_BTQ4[..., :2])
        half_BTQ2 = 0.5 * torch.sigmoid(out_BTQ4[..., 2:])
        boxes_BTQ4 = torch.cat([centers_BTQ2 - half_BTQ2, centers_BTQ2 + half_BTQ2], dim=-1).clamp(0, 1)
        return boxes_BTQ4.transpose(1, 2)


class RelativePoseHead(nn.Module):
    """Features of frames t-1 and t, per patch, pooled -> (dx, dy, in-plane rotation) between them."""

    def __init__(self, dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.pair = nn.Sequential(nn.Linear(2 * dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 3))

    def forward(self, features_BTNd: Tensor) -> Tensor:
        """(B, T-1, 3): translation (x, y) in the task's units, rotation in degrees, for each consecutive pair."""
        f_BTNd = self.norm(features_BTNd)
        pairs_BSN2d = torch.cat([f_BTNd[:, :-1], f_BTNd[:, 1:]], dim=-1)
        return self.head(self.pair(pairs_BSN2d).mean(2))
