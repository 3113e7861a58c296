"""Diagonal empirical Fisher of the dense base weights of the LoRA-adapted modules.

    F_t[m] = (1/N) Σ_n (∂ℓ_n / ∂W_m)²            (elementwise square)

ℓ_n the per-example training loss at the expert θ*_t. For a linear layer y = x Wᵀ (+ b) applied at
the tokens t of example n, the per-example gradient is

    ∂ℓ_n / ∂W_m = Σ_t g_{n,t} ⊗ x_{n,t},      g = ∂(Σ_n ℓ_n) / ∂y,

so ONE forward and ONE backward of Σ_n ℓ_n give every example's gradient: hooks keep each adapted
module's input x and output y, autograd gives g = ∂(Σ ℓ)/∂y, and a batched matmul g_nᵀ x_n gives the
(d_out x d_in) gradient of each example (examples do not interact in eval mode). No parameter's
``.grad`` is touched: the gradient is taken with respect to the captured outputs only.

Data parallel: each rank returns a ``FisherShard`` (sums of squares and the number of examples);
the merge adds shards and divides by the global N.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pm_ray.core.answer_logits import answer_logits, takes_logits_mask
from pm_ray.core.lora import base_weight, lora_layers
from pm_ray.core.tensors import check_same_layout

FISHER_KINDS = ("causal_lm", "classification")
IGNORE_INDEX = -100
# Per-example gradients of one chunk of examples are materialised together; this bounds that
# buffer (float32 elements, 64 MiB) so a 4096 x 4096 module does not allocate N full weights.
_CHUNK_ELEMENTS = 2**24


@dataclass
class FisherShard:
    """Σ_n (∂ℓ_n/∂W_m)² per module (float32) over ``count`` examples."""

    sums: dict[str, torch.Tensor]
    count: int

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 0:
            raise ValueError(f"FisherShard.count must be a non-negative int, got {self.count!r}")

    def merge(self, other: FisherShard) -> FisherShard:
        check_same_layout(self.sums, other.sums, reference_name="fisher shard", other_name="merged fisher shard")
        return FisherShard({key: self.sums[key] + other.sums[key] for key in self.sums}, self.count + other.count)

    def mean(self) -> dict[str, torch.Tensor]:
        """F = sums / N."""
        if self.count == 0:
            raise ValueError("FisherShard.mean: count is 0 (no examples); expected at least one example")
        return {key: tensor / self.count for key, tensor in self.sums.items()}

    @classmethod
    def reduce(cls, shards: Iterable[FisherShard]) -> FisherShard:
        shards = list(shards)
        if not shards:
            raise ValueError("FisherShard.reduce: no shards given; expected at least one")
        return functools.reduce(FisherShard.merge, shards)

    @classmethod
    def mean_of(
        cls, shards: Sequence[FisherShard], out: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """F = (S_0 + S_1 + ...) / N with the shards added in the order given: bit for bit
        ``reduce(shards).mean()``. ``out``: tensors to write F into where the layout matches and no
        shard holds them (the previous task's F, which its owner no longer needs), so a task pays
        no F-sized allocation and its page faults."""
        if not shards:
            raise ValueError("FisherShard.mean_of: no shards given; expected at least one")
        first = shards[0].sums
        if not all(t.dtype == torch.float32 for shard in shards for t in shard.sums.values()):
            return cls.reduce(shards).mean()
        for other in shards[1:]:
            check_same_layout(first, other.sums, reference_name="fisher shard", other_name="merged fisher shard")
        count = sum(shard.count for shard in shards)
        if count == 0:
            raise ValueError("FisherShard.mean: count is 0 (no examples); expected at least one example")
        mean: dict[str, torch.Tensor] = {}
        for key, total in first.items():
            inputs = [shard.sums[key] for shard in shards]
            buffer = (out or {}).get(key)
            if buffer is None or buffer.shape != total.shape or any(buffer is t for t in inputs):
                buffer = torch.empty_like(total, memory_format=torch.contiguous_format)
            if len(inputs) == 1:
                torch.div(total, count, out=buffer)
            else:
                torch.add(inputs[0], inputs[1], out=buffer)
                for other in inputs[2:]:
                    buffer.add_(other)
                buffer.div_(count)
            mean[key] = buffer
        return mean


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """ℓ_n for every example of the batch (float32, shape (N,)).

    ``causal_lm``: mean cross-entropy over the example's target tokens, with labels shifted by one
    as Hugging Face does (token t predicts label t+1) and -100 ignored; an example without any
    target token has loss 0. ``classification``: cross-entropy of logits (N, C) against class ids.
    """
    if kind == "causal_lm":
        if logits.dim() != 3 or labels.shape != logits.shape[:2]:
            raise ValueError(
                f"causal_lm: expected logits (N, T, V) and labels (N, T), got logits {tuple(logits.shape)} "
                f"and labels {tuple(labels.shape)}"
            )
        targets = labels[:, 1:]
        token_loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        ).view(targets.shape)
        n_targets = (targets != IGNORE_INDEX).sum(dim=1)
        return token_loss.sum(dim=1) / n_targets.clamp(min=1)
    if kind == "classification":
        if logits.dim() != 2 or labels.shape != logits.shape[:1]:
            raise ValueError(
                f"classification: expected logits (N, C) and labels (N,), got logits {tuple(logits.shape)} "
                f"and labels {tuple(labels.shape)}"
            )
        return F.cross_entropy(logits.float(), labels, reduction="none")
    raise ValueError(f"loss kind {kind!r} is unknown; expected one of {FISHER_KINDS}")


def _squared_per_example_grads(calls: Sequence[tuple[torch.Tensor, torch.Tensor]], n: int) -> torch.Tensor:
    """Σ_n (Σ_calls g_nᵀ x_n)², (d_out x d_in), for the (x, g) pairs of one module's calls."""
    flat = [(x.reshape(n, -1, x.shape[-1]).float(), g.reshape(n, -1, g.shape[-1]).float()) for x, g in calls]
    d_in, d_out = flat[0][0].shape[-1], flat[0][1].shape[-1]
    chunk = max(1, _CHUNK_ELEMENTS // (d_in * d_out))
    total = torch.zeros(d_out, d_in, dtype=torch.float32, device=flat[0][0].device)
    # fp32 products even when the forward ran under bf16 autocast (trainer.precision: bf16-mixed)
    with torch.autocast(total.device.type, enabled=False):
        for start in range(0, n, chunk):
            # A module called twice in one forward (shared weights) has one gradient: sum before squaring.
            stop = start + chunk
            per_example = sum(torch.bmm(g[start:stop].transpose(1, 2), x[start:stop]) for x, g in flat)
            total += per_example.square().sum(dim=0)
    return total


def _full_shape(weight: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(weight, "ds_shape", weight.shape))


def diagonal_fisher(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    kind: str = "causal_lm",
    adapter_name: str = "default",
    max_examples: int | None = None,
) -> FisherShard:
    """Sums of squared per-example gradients of the base weights of ``adapter_name``'s modules.

    Every batch needs ``labels``; all its other entries are passed to ``model(...)``, whose output
    must have ``.logits``. The model runs in eval mode (no dropout: examples must not interact and
    the Fisher is taken at θ*), each module's train/eval mode is restored afterwards. At most
    ``max_examples`` examples are used (the last batch is cut). Result tensors are float32 on CPU.
    """
    if kind not in FISHER_KINDS:
        raise ValueError(f"loss kind {kind!r} is unknown; expected one of {FISHER_KINDS}")
    bad_max = isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1
    if max_examples is not None and bad_max:
        raise ValueError(f"max_examples must be None or a positive int, got {max_examples!r}")
    layers = lora_layers(model, adapter_name)
    # ds_shape: under DeepSpeed ZeRO-3 a weight's own shape is that of its (empty) local stub
    sums = {key: torch.zeros(_full_shape(base_weight(model, key)), dtype=torch.float32) for key in layers}
    transposed = {key: bool(getattr(layer, "fan_in_fan_out", False)) for key, layer in layers.items()}
    device = next(model.parameters()).device
    captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {key: [] for key in layers}

    def capture(key: str, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        # The LoRA wrapper's output is base(x) + lora(x): its gradient IS the gradient of the base
        # output, and unlike the base output (frozen W, frozen input in the first layer) it
        # requires grad whenever the adapter does. The wrapper's input is the base layer's input.
        captured[key].append((args[0].detach(), output))

    def input_requires_grad(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output if output.requires_grad else output.requires_grad_(True)

    adapter_trainable = any(
        p.requires_grad
        for layer in layers.values()
        for factor in (layer.lora_A[adapter_name], layer.lora_B[adapter_name])
        for p in factor.parameters()
    )
    # a causal LM that takes logits_to_keep: the LM head runs at the answer positions only
    answer_only = kind == "causal_lm" and takes_logits_mask(model)
    modes = {module: module.training for module in model.modules()}
    hooks = [layer.register_forward_hook(functools.partial(capture, key)) for key, layer in layers.items()]
    count = 0
    try:
        model.eval()
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if not adapter_trainable and embeddings is not None:
            # Frozen adapter: make activations require grad from the embeddings on, so that the
            # graph reaches every adapted module's output.
            hooks.append(embeddings.register_forward_hook(input_requires_grad))
        for batch in batches:
            if "labels" not in batch:
                raise ValueError(f"diagonal_fisher: batch has keys {sorted(batch)}; expected a 'labels' entry")
            n = int(batch["labels"].shape[0])
            if max_examples is not None:
                n = min(n, max_examples - count)
            inputs = {name: value[:n].to(device) for name, value in batch.items() if name != "labels"}
            labels = batch["labels"][:n].to(device)
            for calls in captured.values():
                calls.clear()
            with torch.enable_grad():
                if answer_only:
                    losses = answer_logits(model, inputs, labels, sliced=True).per_example_loss(n)
                else:
                    losses = per_example_loss(model(**inputs).logits, labels, kind)
                keys = [key for key, calls in captured.items() for _ in calls]
                outputs = [output for calls in captured.values() for _, output in calls]
                missing = sorted({key for key, out in zip(keys, outputs) if not out.requires_grad})
                if missing:
                    raise ValueError(
                        f"diagonal_fisher: outputs of {missing[:3]} do not require grad; expected a "
                        "trainable adapter or a model with get_input_embeddings()"
                    )
                grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
            per_key: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {key: [] for key in layers}
            for key, (x, _), grad in zip(keys, (pair for calls in captured.values() for pair in calls), grads):
                if grad is not None:  # None: this call does not reach the loss, its gradient is 0
                    per_key[key].append((x, grad))
            for key, calls in per_key.items():
                if calls:
                    squared = _squared_per_example_grads(calls, n)
                    sums[key] += (squared.T if transposed[key] else squared).cpu()
            count += n
            if max_examples is not None and count >= max_examples:
                break  # before pulling another batch: a data loader may be expensive to advance
    finally:
        for hook in hooks:
            hook.remove()
        for calls in captured.values():
            calls.clear()
        for module, training in modes.items():
            module.train(training)
    return FisherShard(sums, count)
