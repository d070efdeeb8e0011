"""Parallelism for pretraining, applied from outside the single-device model (torchtitan's `parallelize_llama`).

`MeshConfig` names four axes, least to most communication-hungry (AXLearn's order): `data` (HSDP replicas), `fsdp`
(FSDP2 `fully_shard`), `context` (two chunks of every sequence per rank) and `tensor` (DTensor TP with sequence
parallel on the norms and residual stream, loss parallel on vocab-sharded logits). `parallelize(model, mesh)` (the
`Mesh` carries its config) applies TP+SP, activation checkpointing, compile, then FSDP2 over data x (fsdp*context).
Tied embeddings stay tied: the embedding is vocab-parallel (Shard(0)) and the tied head multiplies by that same DTensor.
PyTorch's `context_parallel` covers CUDA SDPA kernels only (it fails on CPU in torch 2.13), so context parallel is done
by hand, exact on any backend: `shard_context` gives each rank head-tail chunks of the tokens, their RoPE positions, a
causal mask over those positions, and a KV "cache" that all-gathers keys/values over the context group (autograd-aware).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from pippin.errors import PippinError
from pippin.model.config import ModelConfig
from pippin.model.transformer import TiedLinear, Transformer

AXES = ("data", "fsdp", "context", "tensor")


@dataclass(kw_only=True)
class MeshConfig:
    """The device mesh: the product of the four degrees is the number of processes."""

    data: int = 1
    """Replicated data-parallel degree (HSDP replicas; gradients all-reduced across them)."""
    fsdp: int = 1
    """Fully-sharded data-parallel degree (FSDP2: weights, gradients and optimizer state sharded)."""
    context: int = 1
    """Context-parallel degree: every sequence is cut into 2 x this many chunks, two per rank (head-tail)."""
    tensor: int = 1
    """Tensor-parallel degree (with sequence parallel and loss parallel); must divide the KV head count."""
    loss_parallel: bool = True
    """Under TP, take the loss on vocab-sharded logits instead of gathering them."""

    def __post_init__(self) -> None:
        for axis in AXES:
            if getattr(self, axis) < 1:
                raise PippinError(f"mesh: {axis} must be >= 1, not {getattr(self, axis)}")

    @property
    def world_size(self) -> int:
        return self.data * self.fsdp * self.context * self.tensor

    @property
    def dp_size(self) -> int:
        """Ranks that see different sequences (the data loader's split of the global batch)."""
        return self.data * self.fsdp

    def describe(self) -> str:
        return " x ".join(f"{a} {getattr(self, a)}" for a in AXES if getattr(self, a) > 1) or "1 process"

    def check(self, model: ModelConfig, *, seq_len: int, global_batch: int, world_size: int) -> None:
        """Raise a PippinError naming the first degree that does not divide what it splits."""
        if self.world_size != world_size:
            raise PippinError(f"mesh {self.describe()} needs {self.world_size} processes, but {world_size} were launched")
        if model.n_kv_heads % self.tensor or model.n_heads % self.tensor:
            raise PippinError(f"tensor parallel {self.tensor} must divide the head counts ({model.n_heads}/{model.n_kv_heads})")
        if model.vocab_size % self.tensor:
            raise PippinError(f"tensor parallel {self.tensor} must divide the vocabulary ({model.vocab_size})")
        split = (2 * self.context if self.context > 1 else 1) * self.tensor  # CP cuts 2 x context chunks (head-tail)
        if seq_len % split:
            raise PippinError(f"seq_len {seq_len} must be divisible by {split} ((2 x) context x tensor)")
        if global_batch % self.dp_size:
            raise PippinError(f"global_batch {global_batch} must be divisible by data x fsdp = {self.dp_size}")


@dataclass(frozen=True)
class Mesh:
    """The world mesh with its named axes and the sub-meshes each parallelism uses (None for a single process)."""

    world: DeviceMesh | None
    config: MeshConfig

    def sub(self, *axes: str) -> DeviceMesh:
        return self.world[axes] if len(axes) > 1 else self.world[axes[0]]

    def local_rank(self, axis: str) -> int:
        return 0 if self.world is None else self.world[axis].get_local_rank()

    @property
    def dp_rank(self) -> int:
        return self.local_rank("data") * self.config.fsdp + self.local_rank("fsdp")


def build_mesh(config: MeshConfig, device_type: str) -> Mesh:
    """The 4-axis world mesh (gloo on CPU, nccl on CUDA: whatever the process group was started with)."""
    if config.world_size == 1:
        return Mesh(world=None, config=config)
    shape = tuple(getattr(config, a) for a in AXES)
    world = init_device_mesh(device_type, shape, mesh_dim_names=AXES)
    # FSDP shards over fsdp x context: context ranks hold the same weights (torchtitan's dp_shard_cp).
    world["fsdp", "context"]._flatten("fsdp_context")
    return Mesh(world=world, config=config)


def _apply_tp(model: Transformer, tp: DeviceMesh, *, loss_parallel: bool) -> None:
    """Megatron column/row plan with sequence parallel: the residual stream between blocks is Shard(1) (sequence)."""
    seq_in = {"input_layouts": (Shard(1), None, None, None, None), "desired_input_layouts": (Replicate(), None, None, None, None)}
    parallelize_module(model, tp, {
        "embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),  # vocab-parallel lookup
        "norm": SequenceParallel(),
    })  # fmt: skip
    logits = Shard(-1) if loss_parallel else Replicate()
    if isinstance(model.lm_head, TiedLinear):
        # The head reads the embedding's Shard(0) DTensor: a replicated input gives vocab-sharded logits (B, T, V/tp).
        head = PrepareModuleInputOutput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_input=False,
            output_layouts=(Shard(-1),), desired_output_layouts=(logits,), use_local_output=not loss_parallel,
        )  # fmt: skip
    else:
        head = ColwiseParallel(input_layouts=Shard(1), output_layouts=logits, use_local_output=not loss_parallel)
    parallelize_module(model, tp, {"lm_head": head})
    for block in model.layers:
        plan = {
            "input_layernorm": SequenceParallel(),
            "self_attn": PrepareModuleInput(**seq_in, use_local_output=True),
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            "post_attention_layernorm": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
        }
        if block.self_attn.q_norm is not None:
            # QK-norm weights are shared by all heads; each rank holds some heads (B, H/tp, T, D), i.e. Shard(1), so
            # the replicated weight's gradient is a partial sum that DTensor all-reduces (torchtitan's Qwen3 plan).
            plan["self_attn.q_norm"] = SequenceParallel(sequence_dim=1, use_local_output=True)
            plan["self_attn.k_norm"] = SequenceParallel(sequence_dim=1, use_local_output=True)
        parallelize_module(block, tp, plan)


def parallelize(
    model: Transformer,
    mesh: Mesh,
    *,
    activation_checkpointing: bool = False,
    compile_blocks: bool = False,
    param_dtype: torch.dtype | None = None,
) -> Transformer:
    """Apply TP+SP, activation checkpointing, per-block torch.compile and FSDP2 in place (torchtitan's order).

    param_dtype: bf16 compute under FSDP (weights, gradient reduction and optimizer state stay fp32)."""
    cfg = mesh.config
    if mesh.world is not None and cfg.tensor > 1:
        _apply_tp(model, mesh.sub("tensor"), loss_parallel=cfg.loss_parallel)
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, block in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)
    if compile_blocks:
        for block in model.layers:
            block.compile()  # in place: parameter names do not change (checkpoints stay loadable)
    if mesh.world is not None and cfg.data * cfg.fsdp * cfg.context > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        shard_mesh = mesh.world["data", "fsdp_context"] if cfg.data > 1 else mesh.world["fsdp_context"]
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
        for block in model.layers:
            fully_shard(block, mesh=shard_mesh, mp_policy=mp)
        # Embedding, final norm and the tied head stay in the root group: the head reuses the embedding's weight.
        fully_shard(model, mesh=shard_mesh, mp_policy=mp)
    return model


class ContextKV:
    """The model's KV "cache" under context parallel: returns the keys/values of the whole sequence, all-gathered
    over the context group along T (B, H_kv, T_local, D) -> (B, H_kv, T, D). Backward reduce-scatters the gradients.
    funcol, not torch.distributed.nn.all_gather: the latter's backward is wrong on gloo for non-contiguous gradients
    (pytorch/pytorch#192920), which SDPA produces."""

    def __init__(self, group: DeviceMesh) -> None:
        self.group = group

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kv = funcol.all_gather_tensor_autograd(torch.stack([k, v]).contiguous(), gather_dim=3, group=self.group)
        return kv[0], kv[1]


@dataclass(frozen=True)
class ContextShard:
    """This rank's slice of a batch under context parallel, and the model inputs that make attention exact."""

    tokens: torch.Tensor
    """(B, T/cp) input ids of this rank's slice."""
    labels: torch.Tensor
    positions: torch.Tensor | None
    """(B, T/cp) the positions of this rank's tokens, which are also their RoPE positions (None without CP)."""
    cache: ContextKV | None
    mask: torch.Tensor | None
    """(1, 1, T/cp, T) causal mask: a query at global position p sees keys 0..p."""


def context_positions(rank: int, n: int, T: int, device: torch.device | None = None) -> torch.Tensor:
    """The sequence positions context rank `rank` of `n` holds: chunks r and 2n-1-r of 2n (torchtitan's head-tail
    load balancing, so every rank does the same causal work). (T/n,)"""
    c = T // (2 * n)
    head, tail = rank * c, (2 * n - 1 - rank) * c
    return torch.cat([torch.arange(head, head + c, device=device), torch.arange(tail, tail + c, device=device)])


def shard_context(tokens: torch.Tensor, labels: torch.Tensor, mesh: Mesh) -> ContextShard:
    n = mesh.config.context
    if n == 1:
        return ContextShard(tokens=tokens, labels=labels, positions=None, cache=None, mask=None)
    B, T = tokens.shape
    pos = context_positions(mesh.local_rank("context"), n, T, tokens.device)
    # Keys arrive all-gathered in rank order, each rank's two chunks in turn: their positions are known here.
    key_pos = torch.cat([context_positions(r, n, T, tokens.device) for r in range(n)])
    mask = (pos[:, None] >= key_pos[None, :])[None, None]  # (1, 1, T/n, T)
    return ContextShard(
        tokens=tokens[:, pos].contiguous(), labels=labels[:, pos].contiguous(), positions=pos.expand(B, -1),
        cache=ContextKV(mesh.sub("context")), mask=mask,
    )  # fmt: skip


def world_mean(value: torch.Tensor) -> float:
    """The mean of a per-rank scalar over every rank (each data/context shard counted once per TP rank, equally)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return float(value.detach())
    t = value.detach().float().reshape(1).clone()
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 N (forward + backward of every matmul, head included) + 12 L H D T for attention scores (PaLM's MFU rule)."""
    n = cfg.param_counts()["non_embedding"] + cfg.vocab_size * cfg.dim
    return 6.0 * n + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
