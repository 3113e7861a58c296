"""Memory per GPU of a pm-ray task on a Llama backbone, on paper: ZeRO-2 vs ZeRO-3, LoRA on k,v vs
on all linear layers, plus the merge state per merge shard and the host memory per worker.

    .venv/bin/python benchmarks/scale_memory.py --out benchmarks/results/scale_memory.json

Every figure is a formula of the architecture (numbers below, no download) and of the run's
shape (world size W, micro-batch b, sequence length s, LoRA rank r, merge shards K). What each
term counts, and the code it reads, is in its function's docstring. Units: bytes.
``tests/benchmarks/test_scale_memory.py`` checks the terms against real tensors of pm-ray's
``tiny:llama`` on CPU: base weights, LoRA parameters, the AdamW state and the merge shard's state
exactly, the activations within a tolerance.

Precision regimes (pm_ray/train/engine.py):
  bf16  ``model.dtype: bfloat16`` with DeepSpeed's ``bf16: {enabled: true}`` (CUDA). DeepSpeed casts
        every parameter of a model not built under zero.Init to bf16 (engine.py
        ``_cast_module_mixed_precision``), so under ZeRO-2 the LoRA factors are bf16 with fp32
        master copies; under ZeRO-3 the backbone is built under zero.Init in bf16 and the LoRA
        factors, attached afterwards, stay fp32 (PEFT's dtype) and are not cast.
  fp32  fp32 weights everywhere.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

Precision = Literal["bf16", "fp32"]
Stage = Literal[2, 3]
FP32 = 4
BF16 = 2
GIB = 2**30

KV_TARGETS = ("k_proj", "v_proj")
ALL_LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS: dict[str, tuple[str, ...]] = {"kv": KV_TARGETS, "all_linear": ALL_LINEAR_TARGETS}
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")

# DeepSpeed 0.19.8 defaults that pm-ray's deepspeed_config leaves alone (zero/config.py).
DEEPSPEED_REDUCE_BUCKET_ELEMENTS = 500_000_000  # reduce_bucket_size
DEEPSPEED_PREFETCH_BUCKET_ELEMENTS = 50_000_000  # stage3_prefetch_bucket_size
FISHER_CHUNK_ELEMENTS = 2**24  # pm_ray/core/fisher.py _CHUNK_ELEMENTS


@dataclass(frozen=True)
class Architecture:
    """A Llama-style decoder: no biases, RMSNorm, SwiGLU MLP, grouped-query attention."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool


# From the models' published config.json files (hidden_size, num_hidden_layers, ...).
LLAMA_3_2_1B = Architecture("Llama-3.2-1B", 2048, 16, 32, 8, 64, 8192, 128256, tied_embeddings=True)
LLAMA_3_1_8B = Architecture("Llama-3.1-8B", 4096, 32, 32, 8, 128, 14336, 128256, tied_embeddings=False)
LLAMA_3_1_70B = Architecture("Llama-3.1-70B", 8192, 80, 64, 8, 128, 28672, 128256, tied_embeddings=False)
ARCHITECTURES = {a.name: a for a in (LLAMA_3_2_1B, LLAMA_3_1_8B, LLAMA_3_1_70B)}


def from_hf_config(config: Any, name: str = "hf") -> Architecture:
    """An Architecture from a transformers ``LlamaConfig`` (biases are not modelled: refused)."""
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError(f"{name}: attention_bias / mlp_bias are not modelled")
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Architecture(
        name=name,
        hidden=int(config.hidden_size),
        layers=int(config.num_hidden_layers),
        heads=heads,
        kv_heads=int(config.num_key_value_heads or heads),
        head_dim=int(head_dim),
        intermediate=int(config.intermediate_size),
        vocab=int(config.vocab_size),
        tied_embeddings=bool(config.tie_word_embeddings),
    )


# ---- parameters -----------------------------------------------------------------------------
def projection_shapes(arch: Architecture) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of each linear layer of one decoder layer."""
    q_width, kv_width = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    return {
        "q_proj": (q_width, arch.hidden),
        "k_proj": (kv_width, arch.hidden),
        "v_proj": (kv_width, arch.hidden),
        "o_proj": (arch.hidden, q_width),
        "gate_proj": (arch.intermediate, arch.hidden),
        "up_proj": (arch.intermediate, arch.hidden),
        "down_proj": (arch.hidden, arch.intermediate),
    }


def _module_path(layer: int, projection: str) -> str:
    block = "self_attn" if projection in _ATTENTION else "mlp"
    return f"model.layers.{layer}.{block}.{projection}"


def parameter_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """Every parameter of the base model by its Hugging Face name (LlamaForCausalLM); a tied LM
    head is the embedding (one parameter)."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (arch.vocab, arch.hidden)}
    for layer in range(arch.layers):
        for projection, shape in projection_shapes(arch).items():
            shapes[f"{_module_path(layer, projection)}.weight"] = shape
        shapes[f"model.layers.{layer}.input_layernorm.weight"] = (arch.hidden,)
        shapes[f"model.layers.{layer}.post_attention_layernorm.weight"] = (arch.hidden,)
    shapes["model.norm.weight"] = (arch.hidden,)
    if not arch.tied_embeddings:
        shapes["lm_head.weight"] = (arch.vocab, arch.hidden)
    return shapes


def adapted_modules(arch: Architecture, targets: Iterable[str]) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every LoRA-adapted module, keyed as pm-ray keys them (the merge's keys)."""
    wanted, shapes = set(targets), projection_shapes(arch)
    return {
        _module_path(layer, p): shapes[p] for layer in range(arch.layers) for p in ALL_LINEAR_TARGETS if p in wanted
    }


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def base_parameter_count(arch: Architecture) -> int:
    return sum(_numel(s) for s in parameter_shapes(arch).values())


def adapted_elements(arch: Architecture, targets: Iterable[str]) -> int:
    """A = Σ_m d_out·d_in over the adapted modules: the size of one dense tensor per module."""
    return sum(d_out * d_in for d_out, d_in in adapted_modules(arch, targets).values())


def lora_parameter_count(arch: Architecture, targets: Iterable[str], rank: int) -> int:
    """P = Σ_m r·(d_in + d_out): A_m is r x d_in, B_m is d_out x r."""
    return sum(rank * (d_in + d_out) for d_out, d_in in adapted_modules(arch, targets).values())


def lora_tensor_count(arch: Architecture, targets: Iterable[str]) -> int:
    return 2 * len(adapted_modules(arch, targets))


def weight_bytes(precision: Precision) -> int:
    return BF16 if precision == "bf16" else FP32


def lora_dtype_bytes(precision: Precision, stage: Stage) -> int:
    """bf16 under ZeRO-2's bf16 mode (the engine casts every parameter), else fp32 (module docstring)."""
    return BF16 if precision == "bf16" and stage == 2 else FP32


def partition_numel(numel: int, world: int) -> int:
    """A ZeRO-3 partition: ceil(numel / W) elements (DeepSpeed pads each parameter to W slices)."""
    return -(-numel // world)


def base_weight_bytes(arch: Architecture, precision: Precision, stage: Stage, world: int) -> int:
    """ZeRO-2: every rank holds the whole backbone, N·e; ZeRO-3: Σ_p ceil(numel_p / W)·e.
    (tests/pipeline/test_zero3.py measured the ZeRO-3 form on tiny:llama at W = 2.)"""
    e, shapes = weight_bytes(precision), parameter_shapes(arch).values()
    if stage == 3:
        return sum(partition_numel(_numel(s), world) for s in shapes) * e
    return sum(_numel(s) for s in shapes) * e


def zero3_gathered_bytes(arch: Architecture, precision: Precision) -> int:
    """ZeRO-3's working set while a module runs, an estimate: the largest unit DeepSpeed gathers
    whole (one decoder layer's weights, or the embedding / LM head) plus the prefetch bucket
    (stage3_prefetch_bucket_size elements). DeepSpeed may hold more (stage3_max_live_parameters)."""
    shapes = projection_shapes(arch)
    layer = sum(d_out * d_in for d_out, d_in in shapes.values()) + 2 * arch.hidden
    largest = max(layer, arch.vocab * arch.hidden)
    return (largest + DEEPSPEED_PREFETCH_BUCKET_ELEMENTS) * weight_bytes(precision)


def lora_weight_bytes(lora_params: int, precision: Precision, stage: Stage, world: int) -> int:
    """ZeRO-2: P·e_lora whole on every rank; ZeRO-3: ceil(P / W)·4 (fp32, partitioned; the
    per-tensor padding of ZeRO-3 is ignored here: at most W-1 elements a tensor)."""
    if stage == 3:
        return partition_numel(lora_params, world) * FP32
    return lora_params * lora_dtype_bytes(precision, stage)


def master_weight_bytes(lora_params: int, precision: Precision, stage: Stage, world: int) -> int:
    """fp32 master copy of this rank's partition. ZeRO-2 always clones one (stage_1_and_2.py
    ``single_partition_of_fp32_groups``, in fp32 mode too); ZeRO-3 reuses the partition when it is
    already fp32 (stage3.py), which the LoRA factors are. A plain torch AdamW (engine single/DDP)
    steps the parameters themselves: no copy."""
    return partition_numel(lora_params, world) * FP32 if stage == 2 else 0


def adamw_state_bytes(trainable: int, step_tensors: int) -> int:
    """torch AdamW: exp_avg and exp_avg_sq in the dtype of the tensors it steps (fp32 here), plus
    one fp32 ``step`` scalar per tensor: 2·4·n + 4·step_tensors. Under ZeRO the optimizer steps
    one flat fp32 partition per parameter group (pm-ray has one group): n = ceil(P / W)."""
    return 2 * FP32 * trainable + FP32 * step_tensors


def optimizer_state_bytes(lora_params: int, world: int) -> int:
    """AdamW over this rank's flat fp32 partition (ZeRO-2 and ZeRO-3 alike): 8·ceil(P / W) + 4."""
    return adamw_state_bytes(partition_numel(lora_params, world), step_tensors=1)


def gradient_bytes(lora_params: int, precision: Precision, stage: Stage, world: int) -> int:
    """This rank's gradient partition, ceil(P / W)·e_lora, plus, in ZeRO-2's bf16 mode, its fp32
    copy for the step (stage_1_and_2.py). Gradients exist for the LoRA factors only."""
    share = partition_numel(lora_params, world)
    e = lora_dtype_bytes(precision, stage)
    return share * e + (share * FP32 if e != FP32 else 0)


def reduce_bucket_bytes(precision: Precision, stage: Stage) -> int:
    """The contiguous gradient bucket DeepSpeed allocates whole (contiguous_gradients, default on):
    reduce_bucket_size elements in the trainable parameters' dtype, whatever the model's size."""
    return DEEPSPEED_REDUCE_BUCKET_ELEMENTS * lora_dtype_bytes(precision, stage)


# ---- activations -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Batch:
    micro_batch: int  # b, sequences per rank and step
    seq_len: int  # s, tokens a sequence
    loss_tokens: int  # k, positions a sequence whose logits the loss reads (pm-ray: the answer's)


def _input_groups(targets: set[str]) -> list[tuple[str, ...]]:
    """Modules that read the same input tensor: (q,k,v) read norm1(x), (gate,up) read norm2(x)."""
    groups = [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)]
    return [tuple(m for m in g if m in targets) for g in groups if any(m in targets for m in g)]


def activation_bytes(
    arch: Architecture, targets: Iterable[str], rank: int, batch: Batch, *, act: int, lora: int
) -> int:
    """Bytes autograd saves for backward in one training forward, no gradient checkpointing,
    SDPA attention without a padding mask (k, v at kv_heads: transformers passes enable_gqa).
    ``act``: bytes of an activation element (the weights' dtype); ``lora``: of a LoRA factor's.

    Per decoder layer, T = b·s tokens:
      2 RMSNorms: the fp32 input (pow) and rsqrt          2·(T·h·4 + T·4)
      attention: q, out (T·H·d), k, v (T·Hkv·d), in act;   logsumexp T·H·4
      MLP: gate (SiLU), silu(gate) and up (their product)  3·T·I·act
      LoRA on module m: its input, for dA                 T·d_in·lora (shared by q,k,v and by
                        gate,up when lora = act; o's input is then SDPA's saved output, in the
                        same storage: 0; PEFT casts x to the factor's dtype per module otherwise)
                        and x·Aᵀ, for dB                  T·r·lora
    Layer 0 saves no input norm (the frozen embeddings need no gradient). Once per model: RoPE's
    cos and sin (2·s·d·act: one position row shared by the batch), the final norm (T·h·4 + T·4)
    and the log-softmax of the loss logits (b·k·V·4), plus the loss's position mask (T bytes),
    int64 targets (b·k·8) and a scalar (4). Frozen base weights are saved by their matmuls but are
    parameters, not counted. Not modelled: a padding mask (transformers then repeats k, v to all
    heads and SDPA saves the b·s·s mask), gradient checkpointing, the gradients that exist
    transiently during backward, other SDPA backends' layouts (e.g. a padded logsumexp).
    """
    wanted = set(targets)
    tokens = batch.micro_batch * batch.seq_len
    norm = tokens * arch.hidden * FP32 + tokens * FP32
    attention = (
        2 * tokens * arch.heads * arch.head_dim * act
        + 2 * tokens * arch.kv_heads * arch.head_dim * act
        + tokens * arch.heads * FP32
    )
    mlp = 3 * tokens * arch.intermediate * act
    shapes = projection_shapes(arch)
    lora_saved = 0
    for group in _input_groups(wanted):
        d_in = shapes[group[0]][1]
        copies = 1 if lora == act else len(group)
        if group == ("o_proj",) and lora == act:
            copies = 0  # o's input is the attention output SDPA saved, in the same storage
        lora_saved += copies * tokens * d_in * lora + len(group) * tokens * rank * lora
    per_layer = 2 * norm + attention + mlp + lora_saved
    rope = 2 * batch.seq_len * arch.head_dim * act  # cos, sin: one position row for the whole batch
    loss_rows = batch.micro_batch * batch.loss_tokens
    # pm-ray's answer-position loss (pm_ray/core/answer_logits.py): the bool position mask, the
    # int64 targets and one fp32 scalar
    loss_bookkeeping = tokens * 1 + loss_rows * 8 + FP32
    model = rope + norm + loss_rows * arch.vocab * FP32 + loss_bookkeeping
    return arch.layers * per_layer - norm + model


# ---- the merge and the host ----------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _sorted_module_elements(arch: Architecture, targets: tuple[str, ...]) -> tuple[int, ...]:
    modules = adapted_modules(arch, targets)
    return tuple(_numel(modules[key]) for key in sorted(modules))


def shard_elements(arch: Architecture, targets: Iterable[str], shards: int) -> list[int]:
    """Elements of the adapted modules each merge shard owns: module i of the sorted keys goes to
    shard i mod K (pm_ray/merge/actor.py ``shard_keys``)."""
    ordered = _sorted_module_elements(arch, tuple(targets))
    return [sum(ordered[k::shards]) for k in range(shards)]


def merge_resident_tensors(world: int) -> int:
    """Dense fp32 tensors per module a pm merge shard holds between tasks (MergeShard, LineMerge,
    CurvatureAccumulator): Φ, Ψ, the merged delta (start_next is the same dict), the task's F_t
    (``fisher_mean``) and the W ranks' Fisher sums it was reduced from (``fisher``, kept until the
    next task's first shard arrives): 4 + W."""
    return 4 + world


def merge_peak_tensors(world: int) -> int:
    """Peak while merging task t >= 2, at the save (MergeShard.merge -> strategy.save): the 4 + W
    resident ones, Δ_t (the call's argument), the clone of start that save_tensors makes (aliased
    with merged) and safetensors' serialised copy of merged, start, Φ, Ψ (4): 10 + W. Not measured."""
    return 10 + world


def host_worker_bytes(adapted: int) -> int:
    """Host memory of every training worker (CPU tensors): its Fisher sums (pm_ray/core/fisher.py)
    and the merged state it folds (MergeClient.current), 2 dense fp32 tensors per module."""
    return 2 * FP32 * adapted


def host_rank0_extra_bytes(adapted: int, precision: Precision) -> int:
    """Rank 0 also holds W0 of the adapted modules (the weights' dtype) and the task vector Δ_t (fp32)."""
    return adapted * (weight_bytes(precision) + FP32)


def fisher_gpu_bytes(arch: Architecture, targets: Iterable[str], fisher_batch: int) -> int:
    """Fisher pass, per module, on the GPU (pm_ray/core/fisher.py): the fp32 total (m elements),
    the per-example gradients of a chunk of c = min(batch, max(1, 2^24 // m)) examples and their
    square (2·c·m): for the largest adapted module m. The captured inputs/outputs are not counted."""
    largest = max(_numel(s) for s in adapted_modules(arch, targets).values())
    chunk = min(fisher_batch, max(1, FISHER_CHUNK_ELEMENTS // largest))
    return FP32 * largest * (1 + 2 * chunk)


# ---- the table -------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunShape:
    world: int
    rank: int
    batch: Batch
    precision: Precision
    fisher_batch: int = 8  # fisher.batch_size's default


def training_memory(arch: Architecture, targets_name: str, stage: Stage, shape: RunShape) -> dict[str, int]:
    """Per rank during a training step: each term's bytes and their total."""
    targets = TARGETS[targets_name]
    lora_params = lora_parameter_count(arch, targets, shape.rank)
    p, w = shape.precision, shape.world
    terms = {
        "base_weights": base_weight_bytes(arch, p, stage, w),
        "zero3_gathered": zero3_gathered_bytes(arch, p) if stage == 3 else 0,
        "lora_params": lora_weight_bytes(lora_params, p, stage, w),
        "master_weights": master_weight_bytes(lora_params, p, stage, w),
        "optimizer_states": optimizer_state_bytes(lora_params, w),
        "gradients": gradient_bytes(lora_params, p, stage, w),
        "reduce_bucket": reduce_bucket_bytes(p, stage),
        "activations": activation_bytes(
            arch, targets, shape.rank, shape.batch, act=weight_bytes(p), lora=lora_dtype_bytes(p, stage)
        ),
    }
    return {**terms, "total": sum(terms.values())}


def merge_memory(arch: Architecture, targets_name: str, world: int, shards: int) -> dict[str, int]:
    """The largest merge shard's host bytes between tasks and at its peak, for K = ``shards``."""
    largest = max(shard_elements(arch, TARGETS[targets_name], shards))
    return {
        "shards": shards,
        "largest_shard_elements": largest,
        "resident_bytes": merge_resident_tensors(world) * FP32 * largest,
        "peak_bytes": merge_peak_tensors(world) * FP32 * largest,
    }


def shards_needed(arch: Architecture, targets_name: str, world: int, budget: int) -> int | None:
    """Smallest K whose largest shard's peak fits ``budget`` bytes (None: not even one module a shard)."""
    modules = len(adapted_modules(arch, TARGETS[targets_name]))
    for shards in range(1, modules + 1):
        if merge_memory(arch, targets_name, world, shards)["peak_bytes"] <= budget:
            return shards
    return None


def row(arch: Architecture, targets_name: str, stage: Stage, shape: RunShape, args: argparse.Namespace) -> dict:
    targets = TARGETS[targets_name]
    adapted = adapted_elements(arch, targets)
    budget = int(args.gpu_gib * GIB)
    train = training_memory(arch, targets_name, stage, shape)
    return {
        "model": arch.name,
        "targets": targets_name,
        "zero_stage": stage,
        "world": shape.world,
        "base_parameters": base_parameter_count(arch),
        "lora_parameters": lora_parameter_count(arch, targets, shape.rank),
        "adapted_modules": len(adapted_modules(arch, targets)),
        "adapted_elements": adapted,
        "per_gpu": train,
        "fits_gpu": train["total"] <= budget,
        "fisher_gpu_transient": fisher_gpu_bytes(arch, targets, shape.fisher_batch),
        "host_per_worker": host_worker_bytes(adapted),
        "host_rank0_extra": host_rank0_extra_bytes(adapted, shape.precision),
        "merge": [merge_memory(arch, targets_name, shape.world, k) for k in args.shards],
        "merge_shards_needed": shards_needed(arch, targets_name, shape.world, int(args.shard_gib * GIB)),
    }


def world_for(arch: Architecture, args: argparse.Namespace) -> int:
    return args.world_70b if arch is LLAMA_3_1_70B else args.world


def build_table(args: argparse.Namespace) -> list[dict]:
    rows = []
    for arch in ARCHITECTURES.values():
        for targets_name in TARGETS:
            batch = Batch(args.micro_batch, args.seq_len, args.loss_tokens or args.seq_len)
            rank = args.rank_kv if targets_name == "kv" else args.rank_all
            shape = RunShape(world_for(arch, args), rank, batch, args.precision)
            for stage in (2, 3):
                rows.append({**row(arch, targets_name, stage, shape, args), "lora_rank": rank})
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=8, help="GPUs (ranks) for 1B and 8B: one 8-GPU node")
    parser.add_argument("--world-70b", type=int, default=16, help="GPUs for 70B: two 8-GPU nodes")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--loss-tokens", type=int, default=0, help="positions the loss reads (0: all)")
    parser.add_argument("--rank-kv", type=int, default=8, help="LoRA rank on k,v")
    parser.add_argument("--rank-all", type=int, default=16, help="LoRA rank on all linear layers")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory the totals are held against")
    parser.add_argument("--shard-gib", type=float, default=80.0, help="host memory one merge shard may use")
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def report(args: argparse.Namespace) -> dict[str, Any]:
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"}
    return {
        "benchmark": "scale_memory",
        "settings": settings,
        "deepspeed_defaults": {
            "reduce_bucket_size": DEEPSPEED_REDUCE_BUCKET_ELEMENTS,
            "stage3_prefetch_bucket_size": DEEPSPEED_PREFETCH_BUCKET_ELEMENTS,
        },
        "architectures": {name: asdict(a) for name, a in ARCHITECTURES.items()},
        "rows": build_table(args),
    }


def main(argv: list[str] | None = None) -> Mapping[str, Any]:
    args = parse_args(argv)
    out = report(args)
    text = json.dumps(out, indent=1)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return out


if __name__ == "__main__":
    main()
