"""Small task readouts over core features, after the paper (streaming) and 4DS (all frames).

Shape legend: B clips, T frames, S = T-1 consecutive frame pairs, N = G*G
patch tokens per frame (G the patch grid side), d feature width (the core's),
E readout width, K learned queries, Q query points or objects, C classes,
U = G*up output pixels per side of a dense map, M tokens or queries of a
flattened (frame, token) or (frame, query) axis, X any leading dims, k
coordinates encoded together, F Fourier bands, h attention heads, e = E/h,
2E = keys and values side by side, 2 = (x, y), 4 = box (x0, y0, x1, y1).

Positions are normalized to [0, 1] of the frame (x right, y down); patch n
(row i, column j, row-major) is centred at ((j + 0.5) / G, (i + 0.5) / G).

Every readout first projects the core's outputs to its own width E
(LayerNorm + Linear: core outputs are unnormalized residual streams, and
the readout's capacity must not depend on the core's width), and adds
Fourier patch-position embeddings. Two readings, chosen by ``streaming``:

- streaming (the headline, the paper's design): the answer for frame t is
  read from frame t's output tokens ONLY. Task queries are coordinates
  (Fourier-encoded), never features sampled from another frame; the
  tracking heads carry nothing from frame to frame but their own last
  prediction (a point's position, a box). Whatever else a task needs from
  the past (how the point under the query has been moving, the previous
  camera position) must come through the core's state. An image-only path
  cannot take a shortcut.
- all frames (4DS-style, the second column): one cross-attention layer
  from the queries to every frame's tokens (T*N, with time and patch
  position embeddings) + MLP. No memory is needed; it is the control that
  shows a task is learnable from the features at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

READOUT_WIDTH = 128
"""Default width E of every readout, whatever the core's width d."""


def patch_centers(grid: int) -> Tensor:
    """Normalized (x, y) centres of the patches, (N, 2), row-major."""
    coords = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)


def frame_times(frames: int, count: int, device: torch.device) -> Tensor:
    """Normalized times t / frames of the first ``count`` frames, (count, 1)."""
    return (torch.arange(count, dtype=torch.float32, device=device) / frames)[:, None]


class FourierEncoding(nn.Module):
    """Normalized coordinates (X, k) -> (X, E): sin/cos at octave frequencies, then an MLP.

    Octaves pi * 2^f, f < bands: with 6 bands the finest period is 1/16 of
    the frame, a patch on a 16 x 16 grid, so a query can tell neighbouring
    patches apart.
    """

    def __init__(self, coords: int, width: int, bands: int = 6) -> None:
        super().__init__()
        self.register_buffer("freqs_F", math.pi * 2.0 ** torch.arange(bands, dtype=torch.float32), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(coords * (2 * bands + 1), width), nn.GELU(), nn.Linear(width, width))

    def forward(self, coords_Xk: Tensor) -> Tensor:
        angles_XkF = coords_Xk[..., None] * self.freqs_F
        # (X, k * (2F + 1)): the raw coordinates keep the encoding monotone where the waves repeat.
        waves = torch.cat([coords_Xk, angles_XkF.sin().flatten(-2), angles_XkF.cos().flatten(-2)], dim=-1)
        return self.mlp(waves)


class FrameKeysValues(nn.Module):
    """Core outputs (B, T, N, d) -> keys and values of the readout's attention, (B, T, N, E) each.

    The core's outputs go straight to keys and values of width E (LayerNorm
    + one Linear d -> 2E), plus Fourier patch-position embeddings;
    ``frames`` (the all-frames reading) also adds a time embedding, so
    tokens of different frames that share one attention can be told apart.
    One projection instead of tokens (width E) -> LayerNorm -> key/value
    projection: a linear map of a linear map is a linear map, and on the
    T*N tokens, which dominate a readout's training step, it costs 2d/(d+2E)
    of that (0.4 for a 64-wide core).
    """

    def __init__(self, dim: int, grid: int, width: int, frames: int | None = None) -> None:
        super().__init__()
        self.frames = frames
        # The LayerNorm's affine folds into the Linear: leaving it out keeps the function class
        # and spares the backward pass through the normalization (the features need no gradient).
        self.project = nn.Sequential(nn.LayerNorm(dim, elementwise_affine=False), nn.Linear(dim, 2 * width))
        self.position = FourierEncoding(2, 2 * width)
        self.time = FourierEncoding(1, 2 * width) if frames is not None else None
        self.register_buffer("centers_N2", patch_centers(grid), persistent=False)

    def forward(self, features_BTNd: Tensor) -> tuple[Tensor, Tensor]:
        kv_BTN2E = self.project(features_BTNd) + self.position(self.centers_N2)
        if self.time is not None:
            T = features_BTNd.shape[1]
            kv_BTN2E = kv_BTN2E + self.time(frame_times(self.frames, T, features_BTNd.device))[:, None, :]
        # One split for both halves: slicing each where it is used would zero-fill a full gradient per slice.
        keys_BTNE, values_BTNE = kv_BTN2E.chunk(2, dim=-1)
        return keys_BTNE, values_BTNE


class CrossAttention(nn.Module):
    """Queries (B, Q, E) attend, multi-head, to keys and values (B, M, E); residual.

    No MLP inside: every head follows it with its own output MLP, which is
    the one MLP the readout has.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"readout width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.q = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)

    def forward(self, queries_BQE: Tensor, keys_BME: Tensor, values_BME: Tensor) -> Tensor:
        (B, Q, E), M, h = queries_BQE.shape, keys_BME.shape[1], self.heads
        q_BhQe = self.q(self.norm(queries_BQE)).view(B, Q, h, E // h).transpose(1, 2)
        k_BhMe = keys_BME.reshape(B, M, h, E // h).transpose(1, 2)
        v_BhMe = values_BME.reshape(B, M, h, E // h).transpose(1, 2)
        attended_BhQe = F.scaled_dot_product_attention(q_BhQe, k_BhMe, v_BhMe)
        return queries_BQE + self.proj(attended_BhQe.transpose(1, 2).reshape(B, Q, E))


class Pointer(nn.Module):
    """Where a query lies in one frame: soft-argmax of its similarity to the frame's keys over the patch centres.

    A position read off an attention map (rather than regressed from a
    pooled vector) lets a head that has found the right patch be right from
    the first steps, so a short readout budget measures the features. It is
    the readout's second hop: the query state already holds what the
    cross-attention gathered.
    """

    def __init__(self, width: int, grid: int) -> None:
        super().__init__()
        self.q = nn.Linear(width, width)
        self.log_scale = nn.Parameter(torch.tensor(math.log(4 * width**-0.5)))
        self.register_buffer("centers_N2", patch_centers(grid), persistent=False)

    def forward(self, states_BQE: Tensor, keys_BNE: Tensor) -> tuple[Tensor, Tensor]:
        """(positions (B, Q, 2), peak logit (B, Q, 1)) of each query among the frame's N patches."""
        logits_BQN = self.q(states_BQE) @ keys_BNE.transpose(1, 2) * self.log_scale.exp()
        return logits_BQN.softmax(-1) @ self.centers_N2, logits_BQN.amax(-1, keepdim=True)


class OutputMLP(nn.Module):
    """The readout's MLP: LayerNorm'd query state (X, E), plus ``extra`` raw inputs, -> hidden E -> outputs."""

    def __init__(self, width: int, outputs: int, extra: int = 0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width + extra, width), nn.GELU(), nn.Linear(width, outputs))

    def forward(self, states_XE: Tensor, *extra_X: Tensor) -> Tensor:
        return self.mlp(torch.cat([self.norm(states_XE), *extra_X], dim=-1))


class AttentiveProbe(nn.Module):
    """K learned queries cross-attend to output tokens -> class logits.

    Streaming reads the N tokens of the last frame: the prediction is made
    online at the end of the clip, so anything about motion must come from
    the core's state. All frames reads all T*N tokens.
    """

    def __init__(
        self,
        dim: int,
        grid: int,
        frames: int,
        num_classes: int,
        *,
        streaming: bool,
        width: int = READOUT_WIDTH,
        num_queries: int = 4,
        heads: int = 4,
    ) -> None:
        super().__init__()
        self.streaming, self.width = streaming, width
        self.kv = FrameKeysValues(dim, grid, width, None if streaming else frames)
        self.queries_KE = nn.Parameter(torch.randn(num_queries, width) * 0.02)
        self.attend = CrossAttention(width, heads)
        self.out = OutputMLP(width, num_classes)

    def forward(self, features_BTNd: Tensor) -> Tensor:
        """Logits (B, C)."""
        if self.streaming:
            # Slice before the projection: the same numbers for 1/T of the work.
            features_BTNd = features_BTNd[:, -1:]
        keys_BTNE, values_BTNE = self.kv(features_BTNd)
        queries_BKE = self.queries_KE.expand(keys_BTNE.shape[0], -1, -1)
        pooled_BKE = self.attend(queries_BKE, keys_BTNE.flatten(1, 2), values_BTNE.flatten(1, 2))
        return self.out(pooled_BKE.mean(1))


class DenseDepthHead(nn.Module):
    """Per-patch MLP to an up x up block of log-depth, pixel-shuffled into a (U, U) map per frame.

    Per frame in both readings: depth is a per-frame quantity, and frame t's
    map reads frame t's tokens only.
    """

    def __init__(
        self, dim: int, grid: int, *, up: int = 4, hidden: int = READOUT_WIDTH, init_depth: float = 6.0
    ) -> None:
        super().__init__()
        self.grid, self.up, self.width = grid, up, hidden
        # Affine-free LayerNorm: its affine folds into the Linear (as in FrameKeysValues).
        self.mlp = nn.Sequential(
            nn.LayerNorm(dim, elementwise_affine=False), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, up * up)
        )
        nn.init.constant_(self.mlp[-1].bias, math.log(init_depth))

    def forward(self, features_BTNd: Tensor) -> Tensor:
        """Log-depth (B, T, U, U)."""
        B, T = features_BTNd.shape[:2]
        G, u = self.grid, self.up
        blocks = self.mlp(features_BTNd).view(B, T, G, G, u, u)
        return blocks.permute(0, 1, 2, 4, 3, 5).reshape(B, T, G * u, G * u)


def free_running(
    step: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, ...]],
    keys_BTNE: Tensor,
    values_BTNE: Tensor,
    query_BQk: Tensor,
    *,
    detach: bool,
    batch_training: bool = True,
) -> tuple[Tensor, ...]:
    """A streaming tracker's recurrence: frame t's ``step(prior (X, Q, k), keys (X, N, E), values)`` reads
    only frame t and returns its outputs (X, Q, ...), the first being the next frame's prior (the query
    at t = 0). Returns each output stacked as (B, Q, T, ...).

    With ``detach`` a frame's gradient stops at its prior, so while training (gradients on, and
    ``batch_training``) the chain runs without a graph and then every frame from its prior in one
    batched pass: the loop's numbers, without its many small backward steps.
    """

    def chain() -> tuple[Tensor, ...]:
        prior_BQk, per_frame = query_BQk, []
        # unbind, not keys[:, t]: each slice's backward would zero-fill a whole (B, T, N, E) gradient.
        for keys_BNE, values_BNE in zip(keys_BTNE.unbind(1), values_BTNE.unbind(1), strict=True):
            outputs = step(prior_BQk.detach() if detach else prior_BQk, keys_BNE, values_BNE)
            per_frame.append(outputs)
            prior_BQk = outputs[0]
        return tuple(torch.stack(frames, dim=2) for frames in zip(*per_frame, strict=True))

    if not (detach and batch_training and torch.is_grad_enabled()):
        return chain()
    with torch.no_grad():
        chained_BQTk = chain()[0]
    B, T = keys_BTNE.shape[:2]
    priors_BTQk = torch.cat([query_BQk[:, None], chained_BQTk[:, :, :-1].transpose(1, 2)], dim=1)
    outputs = step(priors_BTQk.flatten(0, 1), keys_BTNE.flatten(0, 1), values_BTNE.flatten(0, 1))
    return tuple(out.view(B, T, *out.shape[1:]).transpose(1, 2) for out in outputs)


class PointTrackHead(nn.Module):
    """Points queried on frame 0, by coordinate -> position and visibility in every frame.

    Streaming is recurrent and free-running, like the box head: the query at
    frame t is the Fourier-encoded position the head itself predicted at t-1
    (at t = 0 the given point), it attends to frame t's tokens only, and the
    answer is that position moved by a step of at most one patch, read from
    what the query gathered. Where the point went must come from frame t's
    tokens around where it was: from a core that carries motion, or, for an
    image-only path, from nothing but frame t's appearance. A step, not a
    pointer over patches, because AJ scores 0.4-7 px at 112 px (TAP-Vid's
    1-16 px at 256) and a patch is 14 px: on the efficiency test set the
    exact tracks rounded to 8 x 8 patch centres score AJ 0.16, while
    standing still scores 0.015. All frames: one query per (point, frame)
    (the frame-0 coordinate plus a frame embedding) attends to all T*N
    tokens and a pointer over frame t's patches gives the position, refined
    within a patch. The MLP gives the visibility either way.
    """

    def __init__(
        self,
        dim: int,
        grid: int,
        frames: int,
        *,
        streaming: bool,
        width: int = READOUT_WIDTH,
        heads: int = 4,
        detach_recurrence: bool = True,
    ) -> None:
        super().__init__()
        self.streaming, self.width, self.grid, self.frames = streaming, width, grid, frames
        self.detach_recurrence = detach_recurrence
        self.kv = FrameKeysValues(dim, grid, width, None if streaming else frames)
        self.query = FourierEncoding(2, width)
        self.query_time = None if streaming else FourierEncoding(1, width)
        self.attend = CrossAttention(width, heads)
        self.pointer = None if streaming else Pointer(width, grid)
        # (dx, dy) (the step, or the refinement within a patch) and the visibility logit; the
        # all-frames pointer's peak says whether anything matched.
        self.out = OutputMLP(width, 3, extra=0 if streaming else 1)
        if streaming:
            # An untrained head stands still (the step starts at zero), the baseline every track starts from.
            nn.init.zeros_(self.out.mlp[-1].weight)
            nn.init.zeros_(self.out.mlp[-1].bias)

    def forward(self, features_BTNd: Tensor, queries_BQ2: Tensor) -> tuple[Tensor, Tensor]:
        """(positions (B, Q, T, 2) normalized, visibility logits (B, Q, T))."""
        if self.streaming:
            return self._track(features_BTNd, queries_BQ2)
        B, T = features_BTNd.shape[:2]
        Q, E = queries_BQ2.shape[1], self.width
        keys_BTNE, values_BTNE = self.kv(features_BTNd)
        time_TE = self.query_time(frame_times(self.frames, T, features_BTNd.device))
        queries_BME = (self.query(queries_BQ2)[:, None] + time_TE[None, :, None]).flatten(1, 2)
        states_XQE = self.attend(queries_BME, keys_BTNE.flatten(1, 2), values_BTNE.flatten(1, 2)).view(B * T, Q, E)
        positions_XQ2, peak_XQ1 = self.pointer(states_XQE, keys_BTNE.flatten(0, 1))
        out_XQ3 = self.out(states_XQE, peak_XQ1)
        positions_XQ2 = positions_XQ2 + (0.5 / self.grid) * torch.tanh(out_XQ3[..., :2])
        positions_BQT2 = positions_XQ2.view(B, T, Q, 2).transpose(1, 2)
        return positions_BQT2, out_XQ3[..., 2].view(B, T, Q).transpose(1, 2)

    def _step(self, prior_XQ2: Tensor, keys_XNE: Tensor, values_XNE: Tensor) -> tuple[Tensor, Tensor]:
        """One frame: (position (X, Q, 2), visibility logit (X, Q)) of points last put at prior_XQ2."""
        out_XQ3 = self.out(self.attend(self.query(prior_XQ2), keys_XNE, values_XNE))
        # At most a patch per frame: the efficiency set's fastest point moves half of one.
        return prior_XQ2 + torch.tanh(out_XQ3[..., :2]) / self.grid, out_XQ3[..., 2]

    def _track(self, features_BTNd: Tensor, queries_BQ2: Tensor) -> tuple[Tensor, Tensor]:
        """Streaming: frame by frame, each point's previous position steps by what frame t says."""
        keys_BTNE, values_BTNE = self.kv(features_BTNd)
        positions_BQT2, visibility_BQT = free_running(
            self._step, keys_BTNE, values_BTNE, queries_BQ2, detach=self.detach_recurrence
        )
        return positions_BQT2, visibility_BQT


class BoxTrackHead(nn.Module):
    """Objects queried by their frame-0 box -> a box in every frame.

    Streaming is recurrent and free-running: the query at frame t is the
    encoded box the head itself predicted at t-1 (at t = 0 the given box),
    and it attends to frame t's tokens only; the head has no other state.
    ``detach_recurrence`` stops gradients through the chain of predictions.
    All frames: one query per (object, frame), the frame-0 box plus a frame
    embedding, attends to all T*N tokens. Either way a pointer over frame
    t's patches gives the centre (refined within a patch), and the size is
    the prior box's (the query's) shifted in logit space, so an untrained
    head keeps the box's size.
    """

    def __init__(
        self,
        dim: int,
        grid: int,
        frames: int,
        *,
        streaming: bool,
        width: int = READOUT_WIDTH,
        heads: int = 4,
        detach_recurrence: bool = True,
    ) -> None:
        super().__init__()
        self.streaming, self.width, self.grid, self.frames = streaming, width, grid, frames
        self.detach_recurrence = detach_recurrence
        self.kv = FrameKeysValues(dim, grid, width, None if streaming else frames)
        self.query = FourierEncoding(4, width)
        self.query_time = None if streaming else FourierEncoding(1, width)
        self.attend = CrossAttention(width, heads)
        self.pointer = Pointer(width, grid)
        # (dx, dy) within a patch and the size change (w, h); the pointer's peak says whether anything matched.
        self.out = OutputMLP(width, 4, extra=1)

    def box(self, states_XQE: Tensor, keys_XNE: Tensor, prior_XQ4: Tensor) -> Tensor:
        """One frame's boxes (X, Q, 4) from the query states, that frame's keys, and the query's box."""
        centers_XQ2, peak_XQ1 = self.pointer(states_XQE, keys_XNE)
        out_XQ4 = self.out(states_XQE, peak_XQ1)
        centers_XQ2 = centers_XQ2 + (0.5 / self.grid) * torch.tanh(out_XQ4[..., :2])
        # Size as a logit shift of the prior's: it starts at the prior's and stays in (0, 1), so a
        # free-running box cannot compound into one that covers the frame (clamped: no gradient) or vanishes.
        prior_size_XQ2 = (prior_XQ4[..., 2:] - prior_XQ4[..., :2]).clamp(1e-3, 1 - 1e-3)
        half_XQ2 = 0.5 * torch.sigmoid(torch.logit(prior_size_XQ2) + out_XQ4[..., 2:])
        return torch.cat([centers_XQ2 - half_XQ2, centers_XQ2 + half_XQ2], dim=-1).clamp(0, 1)

    def forward(self, features_BTNd: Tensor, query_boxes_BQ4: Tensor) -> Tensor:
        """Boxes (B, Q, T, 4), normalized (x0, y0, x1, y1) clamped to the frame."""
        B, T = features_BTNd.shape[:2]
        Q, E = query_boxes_BQ4.shape[1], self.width
        keys_BTNE, values_BTNE = self.kv(features_BTNd)
        if not self.streaming:
            time_TE = self.query_time(frame_times(self.frames, T, features_BTNd.device))
            queries_BME = (self.query(query_boxes_BQ4)[:, None] + time_TE[None, :, None]).flatten(1, 2)
            states_BME = self.attend(queries_BME, keys_BTNE.flatten(1, 2), values_BTNE.flatten(1, 2))
            prior_XQ4 = query_boxes_BQ4[:, None].expand(B, T, Q, 4).flatten(0, 1)
            boxes_XQ4 = self.box(states_BME.view(B * T, Q, E), keys_BTNE.flatten(0, 1), prior_XQ4)
            return boxes_XQ4.view(B, T, Q, 4).transpose(1, 2)
        (boxes_BQT4,) = free_running(self._step, keys_BTNE, values_BTNE, query_boxes_BQ4, detach=self.detach_recurrence)
        return boxes_BQT4

    def _step(self, prior_XQ4: Tensor, keys_XNE: Tensor, values_XNE: Tensor) -> tuple[Tensor]:
        """One frame: the boxes (X, Q, 4) of objects last boxed at prior_XQ4."""
        return (self.box(self.attend(self.query(prior_XQ4), keys_XNE, values_XNE), keys_XNE, prior_XQ4),)


class RelativePoseHead(nn.Module):
    """Camera motion (dx, dy, in-plane rotation) between frames t-1 and t, for t = 1 .. T-1.

    Streaming: K learned queries pool frame t's tokens alone into the MLP;
    no pairing with frame t-1's features, so where the camera was must come
    through the core. All frames: per pair, the K queries plus the frame's
    embedding attend to all T*N tokens.
    """

    def __init__(
        self,
        dim: int,
        grid: int,
        frames: int,
        *,
        streaming: bool,
        width: int = READOUT_WIDTH,
        heads: int = 4,
        num_queries: int = 4,
    ) -> None:
        super().__init__()
        self.streaming, self.width, self.frames = streaming, width, frames
        self.kv = FrameKeysValues(dim, grid, width, None if streaming else frames)
        self.queries_KE = nn.Parameter(torch.randn(num_queries, width) * 0.02)
        self.query_time = None if streaming else FourierEncoding(1, width)
        self.attend = CrossAttention(width, heads)
        self.out = OutputMLP(width, 3)

    def forward(self, features_BTNd: Tensor) -> Tensor:
        """(B, S, 3): translation (x, y) in the task's units, rotation in degrees, for each consecutive pair."""
        B, T = features_BTNd.shape[:2]
        K, E = self.queries_KE.shape
        S = T - 1
        if self.streaming:
            # Frame 0 ends no pair: slice it off before the projection.
            keys_BSNE, values_BSNE = self.kv(features_BTNd[:, 1:])
            pooled_XKE = self.attend(
                self.queries_KE.expand(B * S, K, E), keys_BSNE.flatten(0, 1), values_BSNE.flatten(0, 1)
            )
            return self.out(pooled_XKE.mean(1)).view(B, S, 3)
        keys_BTNE, values_BTNE = self.kv(features_BTNd)
        time_SE = self.query_time(frame_times(self.frames, T, features_BTNd.device)[1:])
        queries_BSKE = (self.queries_KE + time_SE[:, None]).expand(B, S, K, E)
        pooled_BME = self.attend(queries_BSKE.flatten(1, 2), keys_BTNE.flatten(1, 2), values_BTNE.flatten(1, 2))
        pooled_BSKE = pooled_BME.view(B, S, K, E)
        return self.out(pooled_BSKE.mean(2))
