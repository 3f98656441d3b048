"""The one place the trainable model is wrapped for training; model code never imports deepspeed.

Order, for both engines: (1) the ``FuturePredictor`` (every trainable
parameter, nothing else) goes to the rank's device in fp32; (2) an AdamW over
its parameters is built here, a torch one, so no DeepSpeed op is compiled;
(3) with DeepSpeed, the module and that optimizer are handed to
``deepspeed.initialize`` with a config generated from the typed config.

The frozen encoder is never passed here. With bf16 on, DeepSpeed casts every
parameter of the module it wraps, frozen ones included, and would keep them in
its bookkeeping; the encoder stays beside the engine instead (bf16 on CUDA, one
copy per rank, no gradients, no optimizer state).

Both engines implement one complete interface (``TrainEngine``): the forward
call, ``backward``, ``step`` and their checkpoint state, so neither the trainer
nor the checkpointer (``pretrain.checkpointer``) ever asks which engine runs.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from pretrain.checkpoint import LAYOUT_DEEPSPEED, CheckpointError, check_engine_files, safe_torch_load
from pretrain.config import BatchPlan, Config
from pretrain.distributed import DistContext

log = logging.getLogger(__name__)

ENGINE_SUBDIR = "engine"
"""Where DeepSpeed's own checkpoint files live inside a tag directory."""
DEEPSPEED_CONFIG_FILE = "deepspeed_config.json"


@dataclass(slots=True)
class StepOutcome:
    applied: bool
    """False when the step was skipped (a non-finite loss or gradient on any rank)."""
    grad_norm: float
    """Global gradient 2-norm before clipping (nan when skipped or not reported)."""


class TrainEngine(Protocol):
    """What the trainer and the checkpointer need from an engine; ``LocalEngine`` and ``DeepSpeedEngine`` are both.

    One optimizer step is ``grad_accum`` times (``engine(*inputs)``, ``backward(loss)``), then
    ``step(skip)``: accumulation, clipping, the non-finite guard and the update happen inside.

    A checkpoint has one of two layouts (``pretrain.checkpoint``), and ``sharded`` says which this
    engine writes. Either way ``state_dict()`` goes into the tag's ``state.pt`` and ``save(tag_dir)``
    writes whatever the engine keeps in files of its own; resume is ``load_state_dict(state)``,
    which first refuses a checkpoint of another layout (CheckpointError), then ``load(tag_dir)``.
    """

    module: nn.Module
    """The single-device model (train/eval mode, parameters, evaluation and export)."""
    optimizer: torch.optim.Optimizer
    """The torch optimizer; the LR scheduler drives its param groups."""
    sharded: bool
    """False: one process writes the whole state into one state.pt (model and optimizer come from
    ``state_dict``). True: every rank writes its own files (``save``) and its own rank state file."""

    def __call__(self, *inputs: Any) -> torch.Tensor:
        """The training forward (through the wrapper, where there is one); gradients flow to ``module``."""
        ...

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of one micro-batch's mean loss (scaled by 1 / grad_accum inside)."""
        ...

    def step(self, skip: bool) -> StepOutcome:
        """At the accumulation boundary: clip, then update unless ``skip`` or a gradient is non-finite."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """What this engine records in state.pt: model and optimizer, or the shard layout it wrote."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a checkpoint's state.pt; CheckpointError (no path) when it has another layout."""
        ...

    def save(self, tag_dir: Path) -> None:
        """Collective: write the engine's own files under ``tag_dir`` (none when not ``sharded``)."""
        ...

    def load(self, tag_dir: Path) -> None:
        """Collective: read back what ``save`` wrote (nothing when not ``sharded``)."""
        ...


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips its update when asked or when any rank holds a non-finite gradient.

    DeepSpeed's ZeRO-1/2 optimizers already skip non-finite steps; ZeRO-0 with a
    client optimizer does not, hence the check here. ``overflow`` is the
    attribute DeepSpeed reads to report ``was_step_applied()``.
    """

    def __init__(self, *args: Any, check_group: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skip_requested = False
        self.overflow = False
        self._check_group = check_group

    def reset_guard(self, skip: bool) -> None:
        self.skip_requested = skip
        self.overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        if self.skip_requested or self._any_nonfinite_grad():
            self.overflow = True
            return None
        return super().step(closure)

    def _any_nonfinite_grad(self) -> bool:
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        bad = torch.zeros((), dtype=torch.float32)
        if grads:
            bad = (~torch.stack([torch.isfinite(g).all() for g in grads]).all()).float().cpu()
        if self._check_group and torch.distributed.is_initialized():
            # ZeRO shards hold different parts of the gradient: all ranks must agree to skip.
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        return bool(bad.item())


def build_optimizer(model: nn.Module, cfg: Config, *, check_group: bool = False) -> GuardedAdamW:
    """AdamW over trainable parameters; no weight decay on norms, biases and embeddings-as-vectors."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = {"fused": True} if cfg.distributed.optimizer == "adamw_fused" else {}
    return GuardedAdamW(groups, lr=cfg.train.lr, betas=tuple(cfg.train.betas), check_group=check_group, **fused)


class LocalEngine:
    """One process, plain torch: accumulation, clipping and the non-finite guard done here."""

    sharded = False

    def __init__(self, model: nn.Module, cfg: Config, plan: BatchPlan) -> None:
        self.module = model
        self.optimizer = build_optimizer(model, cfg)
        self.grad_clip = cfg.train.grad_clip
        self.plan = plan

    def __call__(self, *inputs: Any) -> torch.Tensor:
        return self.module(*inputs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.plan.grad_accum).backward()

    def step(self, skip: bool) -> StepOutcome:
        params = [p for p in self.module.parameters() if p.requires_grad]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
        applied = not skip and math.isfinite(grad_norm)
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(applied, grad_norm)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("layout") == LAYOUT_DEEPSPEED:
            raise CheckpointError(
                f"was written by DeepSpeed on {state['world_size']} rank(s); resume it under a launcher "
                "(or with distributed.engine='deepspeed'), or export it and start a new run.name"
            )
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def save(self, tag_dir: Path) -> None:
        """Nothing: model and optimizer are all in ``state_dict``."""

    def load(self, tag_dir: Path) -> None:
        """Nothing: ``load_state_dict`` restored everything."""


def use_bf16(cfg: Config, device: torch.device) -> bool:
    if cfg.distributed.precision == "auto":
        return device.type == "cuda"
    return cfg.distributed.precision == "bf16"


def deepspeed_config(cfg: Config, plan: BatchPlan, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed config, generated from the typed config (never kept as a second source of truth)."""
    stage = cfg.distributed.zero_stage
    zero: dict[str, Any] = {"stage": stage}
    if stage > 0:
        zero |= {"contiguous_gradients": True, "overlap_comm": device.type == "cuda"}
    return {
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum,
        # DeepSpeed's default is 1.0, not "off": always set it from train.grad_clip (0 = off).
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16(cfg, device)},
        "fp16": {"enabled": False},
        # The optimizer is a torch AdamW subclass passed in; ZeRO otherwise refuses it by type.
        "zero_allow_untested_optimizer": True,
        # Metrics are logged by the trainer; DeepSpeed's own step prints would only add noise.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _skip_shm_build() -> None:
    """Stop ``deepspeed.initialize`` from compiling its shared-memory comm op (a hidden 2-3 min build on CPU).

    Only inference uses that op. The patch must land on the module object in
    sys.modules: ``import deepspeed.comm.torch as m`` binds torch's module of the
    same dotted name instead. A compile killed half-way would leave a ``lock``
    in TORCH_EXTENSIONS_DIR that hangs every later run; never starting it is
    the only sure way not to leave one.
    """
    import deepspeed.comm.torch  # noqa: F401  (loads the module into sys.modules)

    comm_torch = sys.modules["deepspeed.comm.torch"]
    comm_torch.build_shm_op = lambda *args, **kwargs: None


class DeepSpeedEngine:
    """A DeepSpeed engine around the trainable model; accumulation, clipping, ZeRO inside DeepSpeed."""

    sharded = True

    def __init__(self, model: nn.Module, cfg: Config, plan: BatchPlan, ctx: DistContext, run_dir: Path) -> None:
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        _skip_shm_build()
        if plan.world_size != ctx.world_size:
            raise RuntimeError(f"batch plan is for {plan.world_size} ranks, the group has {ctx.world_size}")
        self.ds_config = deepspeed_config(cfg, plan, ctx.device)
        self.zero_stage = cfg.distributed.zero_stage
        self.bf16 = self.ds_config["bf16"]["enabled"]
        client = build_optimizer(model, cfg, check_group=True)
        with ctx.collective("deepspeed.initialize"):
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=client, config=self.ds_config)
        self.engine = engine
        self.module = engine.module
        # The scheduler drives the client optimizer's param groups; ZeRO shares those dicts.
        self.optimizer = client
        self.ctx = ctx
        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / DEEPSPEED_CONFIG_FILE).write_text(json.dumps(self.ds_config, indent=2) + "\n")
        log.info("DeepSpeed ZeRO-%d, %s, config in %s", self.zero_stage, "bf16" if self.bf16 else "fp32", run_dir)

    def __call__(self, *inputs: Any) -> torch.Tensor:
        return self.engine(*inputs)

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed divides by the accumulation steps and averages over ranks itself.
        with self.ctx.collective("backward (gradient reduction)"):
            self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            # Between boundaries step() only advances DeepSpeed's micro-step counter.
            self.engine.step()

    def step(self, skip: bool) -> StepOutcome:
        self.optimizer.reset_guard(skip)
        pre_clip_norm = self._replicated_grad_norm() if self.zero_stage == 0 and not self.bf16 else None
        with self.ctx.collective("optimizer step"):
            self.engine.step()
        applied = self.engine.was_step_applied() and not self.optimizer.overflow
        norm = self.engine.get_global_grad_norm()
        norm = pre_clip_norm if norm is None else float(norm)
        return StepOutcome(applied, norm if applied and norm is not None else float("nan"))

    def _replicated_grad_norm(self) -> float:
        """ZeRO-0 in fp32 keeps full averaged gradients on the module and reports no norm itself."""
        grads = [p.grad.detach().float() for p in self.module.parameters() if p.grad is not None]
        if not grads:
            return 0.0
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()

    def state_dict(self) -> dict[str, Any]:
        """The layout of the shards ``save`` writes: resuming needs the same world size and ZeRO stage."""
        return {"world_size": self.ctx.world_size, "zero_stage": self.zero_stage}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check the checkpoint's layout against this engine's; the tensors come from ``load``."""
        if state.get("layout") != LAYOUT_DEEPSPEED:
            raise CheckpointError("was written by the single-process torch engine; resume it without a launcher")
        if state["world_size"] != self.ctx.world_size or state["zero_stage"] != self.zero_stage:
            raise CheckpointError(
                f"holds ZeRO-{state['zero_stage']} shards of {state['world_size']} rank(s); this run has "
                f"distributed.zero_stage={self.zero_stage} on {self.ctx.world_size} rank(s). "
                "Resume with the same layout, or export it and start a new run.name"
            )

    def save(self, tag_dir: Path) -> None:
        """Collective: every rank writes its ZeRO shard under tag_dir/engine."""
        with self.ctx.collective("checkpoint save"):
            self.engine.save_checkpoint(str(tag_dir), tag=ENGINE_SUBDIR, save_latest=False)

    def load(self, tag_dir: Path) -> None:
        # DeepSpeed unpickles its files unrestricted: vet what they would import first.
        check_engine_files(tag_dir)
        with self.ctx.collective("checkpoint load"):
            path, _ = self.engine.load_checkpoint(str(tag_dir), tag=ENGINE_SUBDIR, load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no engine state in {tag_dir / ENGINE_SUBDIR}")


def build_engine(model: nn.Module, cfg: Config, plan: BatchPlan, ctx: DistContext, run_dir: Path) -> TrainEngine:
    """Place the trainable model on the rank's device and wrap it as the config and launcher ask."""
    model = model.to(ctx.device)
    if ctx.use_deepspeed:
        return DeepSpeedEngine(model, cfg, plan, ctx, run_dir)
    return LocalEngine(model, cfg, plan)


def consolidate_zero_checkpoint(tag_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole trainable model from a DeepSpeed tag directory (offline, CPU, no group).

    Every stage starts from the module state DeepSpeed's rank 0 saved
    (``mp_rank_00_model_states.pt["module"]``: all tensors, in the training
    dtype), which alone is right for ZeRO-0 in fp32. Where fp32 masters sit
    in optimizer shards (ZeRO-1/2, bf16), ``get_fp32_state_dict_from_zero_checkpoint``
    overlays them: on ZeRO-2 it returns every tensor, on ZeRO-1 it drops
    frozen parameters, which the module state then still supplies.
    """
    engine_dir = Path(tag_dir) / ENGINE_SUBDIR
    model_file = engine_dir / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise FileNotFoundError(f"no DeepSpeed model state at {model_file}")
    check_engine_files(tag_dir)
    saved = safe_torch_load(model_file)
    state = {k: v.float() if v.is_floating_point() else v for k, v in saved["module"].items()}
    if not list(engine_dir.glob("*zero_pp_rank_*optim_states.pt")):
        # ZeRO-0 in fp32: the optimizer lives in the model state file and the module weights are the masters.
        return state
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    masters = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir), tag=ENGINE_SUBDIR)
    unknown = set(masters) - set(state)
    if unknown:
        raise ValueError(f"{engine_dir}: ZeRO shards hold tensors the module does not: {sorted(unknown)}")
    state.update({k: v.float() for k, v in masters.items()})
    return state
