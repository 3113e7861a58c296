"""benchmarks/scale_memory.py's formula against real tensors of pm-ray's tiny:llama on CPU.

Exact (bytes equal): the base weights, the LoRA parameters, the AdamW state after one real step and
what a pm merge shard holds after merging 2 tasks. Within ACTIVATION_TOLERANCE: the bytes autograd
saves in one training forward (saved_tensors_hooks), in the three dtype regimes of the formula.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pm_ray.config_sections import TrainerSection
from pm_ray.core.lora import lora_layers
from pm_ray.merge.actor import MergeShard, shard_keys
from pm_ray.models.backbone import load_backbone
from pm_ray.models.lora import ALL_LINEAR, attach_lora
from pm_ray.train.engine import build_engine

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("scale_memory", ROOT / "benchmarks" / "scale_memory.py")
sm = importlib.util.module_from_spec(_spec)
sys.modules["scale_memory"] = sm  # its dataclasses look their module up while they are built
_spec.loader.exec_module(sm)

RANK = 4
LORA_TARGETS = {"kv": None, "all_linear": ALL_LINEAR}  # attach_lora's targets for each formula case
# The activation formula counts every tensor saved here (measured: equal to the byte in the 6
# cases); the tolerance leaves room for small saved tensors another torch/transformers adds.
ACTIVATION_TOLERANCE = 0.01


def tiny_model(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    return load_backbone("tiny:llama", dtype=dtype)


def test_architecture_is_the_real_model_parameter_by_parameter() -> None:
    model, _ = tiny_model()
    arch = sm.from_hf_config(model.config, "tiny:llama")
    assert sm.parameter_shapes(arch) == {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert sm.base_weight_bytes(arch, "fp32", 2, 1) == sum(p.nbytes for p in model.parameters())
    bf16, _ = tiny_model(torch.bfloat16)
    assert sm.base_weight_bytes(arch, "bf16", 2, 1) == sum(p.nbytes for p in bf16.parameters())
    # tests/pipeline/test_zero3.py measured 215,168 resident base bytes per rank at world 2 (docs/scale.md)
    assert sm.base_weight_bytes(arch, "fp32", 3, 2) == 215_168


@pytest.mark.parametrize("arch", [sm.LLAMA_3_2_1B, sm.LLAMA_3_1_8B])
def test_published_shapes_are_what_transformers_builds(arch: Any) -> None:
    config = LlamaConfig(
        hidden_size=arch.hidden,
        num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads,
        num_key_value_heads=arch.kv_heads,
        head_dim=arch.head_dim,
        intermediate_size=arch.intermediate,
        vocab_size=arch.vocab,
        tie_word_embeddings=arch.tied_embeddings,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert sm.parameter_shapes(arch) == {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert sm.from_hf_config(config, arch.name) == arch


def saved_storages(model: torch.nn.Module) -> tuple[Any, dict[int, int]]:
    """A saved_tensors_hooks context recording every storage autograd saves, by data pointer, with
    its bytes; the model's parameters (frozen weights its matmuls save) are left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params and storage.nbytes():
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), seen


def training_batch(vocab: int, batch: Any) -> dict[str, torch.Tensor]:
    """Random tokens, no padding (no attention mask); the loss reads the last ``loss_tokens`` positions."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch.micro_batch, batch.seq_len), generator=gen)
    labels = ids.clone()
    labels[:, : batch.seq_len - batch.loss_tokens] = -100  # position p predicts p + 1
    return {"input_ids": ids, "labels": labels}


# (regime, base dtype, LoRA dtype): fp32; ZeRO-2's bf16 mode (DeepSpeed casts the LoRA factors to
# bf16); ZeRO-3's bf16 mode (bf16 backbone, PEFT's fp32 factors)
REGIMES = [
    ("fp32", torch.float32, torch.float32),
    ("bf16 zero2", torch.bfloat16, torch.bfloat16),
    ("bf16 zero3", torch.bfloat16, torch.float32),
]


@pytest.mark.parametrize("targets", list(LORA_TARGETS))
def test_lora_adamw_and_activation_bytes(targets: str) -> None:
    batch = sm.Batch(micro_batch=2, seq_len=48, loss_tokens=8)
    for regime, base_dtype, lora_dtype in REGIMES:
        model, _ = tiny_model(base_dtype)
        arch = sm.from_hf_config(model.config, "tiny:llama")
        peft = attach_lora(model, rank=RANK, alpha=2 * RANK, targets=LORA_TARGETS[targets])
        if lora_dtype == base_dtype:  # what DeepSpeed's bf16 mode does to a model not built under zero.Init
            peft.to(base_dtype)
        for name, p in peft.named_parameters():
            assert p.dtype == (lora_dtype if "lora_" in name else base_dtype), (regime, name)
        params = [p for p in peft.parameters() if p.requires_grad]
        assert set(lora_layers(peft)) == set(sm.adapted_modules(arch, sm.TARGETS[targets]))
        assert sum(p.numel() for p in params) == sm.lora_parameter_count(arch, sm.TARGETS[targets], RANK)

        engine = build_engine(TrainerSection(engine="single", lr=1e-3), peft, params)
        peft.train()
        hooks, saved = saved_storages(peft)
        with hooks:
            loss = engine.forward_loss(training_batch(arch.vocab, batch))
        engine.backward(loss)
        engine.step()

        measured = sum(saved.values())
        act, lora = sm.FP32 if base_dtype == torch.float32 else sm.BF16, lora_dtype.itemsize
        formula = sm.activation_bytes(arch, sm.TARGETS[targets], RANK, batch, act=act, lora=lora)
        print(f"activations {targets} {regime}: measured {measured}, formula {formula}")
        assert abs(measured - formula) <= ACTIVATION_TOLERANCE * measured, (regime, measured, formula)
        if regime != "fp32":
            continue
        state = [t for s in engine.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        lora_params = sm.lora_parameter_count(arch, sm.TARGETS[targets], RANK)
        assert sum(t.nbytes for t in state) == sm.adamw_state_bytes(lora_params, step_tensors=len(params))
        assert sum(p.nbytes for p in params) == sm.lora_weight_bytes(lora_params, "fp32", 2, 1)


def reachable_tensors(obj: Any, seen: set[int] | None = None) -> Iterator[torch.Tensor]:
    """Every tensor reachable from ``obj`` through attributes, dicts, lists and tuples."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from reachable_tensors(value, seen)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from reachable_tensors(value, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, Path)):
        yield from reachable_tensors(vars(obj), seen)


def held_bytes(obj: Any) -> int:
    """Bytes of the distinct storages of every tensor ``obj`` holds."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in reachable_tensors(obj)}
    return sum(storages.values())


@pytest.mark.parametrize("targets", list(LORA_TARGETS))
def test_merge_shard_state_after_two_tasks(targets: str, tmp_path: Path) -> None:
    """Two pm merge shards fed two ranks' Fisher sums and the task vectors of 2 tasks: each holds
    (4 + W) dense fp32 tensors a module of its share, as the formula says."""
    model, _ = tiny_model()
    arch = sm.from_hf_config(model.config, "tiny:llama")
    modules, world, shards = sm.adapted_modules(arch, sm.TARGETS[targets]), 2, 2
    gen = torch.Generator().manual_seed(0)
    owners = [MergeShard("pm", {}, k, shards, str(tmp_path)) for k in range(shards)]
    keys = shard_keys(list(modules), shards)
    for task in (1, 2):
        for shard, own in zip(owners, keys):
            for rank in range(world):
                sums = {key: torch.rand(modules[key], generator=gen) for key in own}
                shard.add_fisher(task, sums, count=4, rank=rank)
            delta = {key: 0.01 * torch.randn(modules[key], generator=gen) for key in own}
            shard.merge(task, delta, alpha=None)
    elements = sm.shard_elements(arch, sm.TARGETS[targets], shards)
    for shard, n in zip(owners, elements):
        assert shard.strategy.num_tasks == 2
        assert held_bytes(shard.strategy) == 3 * sm.FP32 * n  # Φ, Ψ, merged (= start)
        assert held_bytes(shard) == sm.merge_resident_tensors(world) * sm.FP32 * n
    largest = sm.merge_memory(arch, targets, world, shards)
    assert largest["resident_bytes"] == max(held_bytes(s) for s in owners)


def test_table_covers_every_case_and_zero3_divides_the_backbone() -> None:
    out = sm.report(sm.parse_args([]))
    cases = {(r["model"], r["targets"], r["zero_stage"]) for r in out["rows"]}
    assert len(cases) == len(out["rows"]) == 3 * 2 * 2
    for r in out["rows"]:
        if r["zero_stage"] == 3:
            zero2 = next(
                x for x in out["rows"] if (x["model"], x["targets"], x["zero_stage"]) == (r["model"], r["targets"], 2)
            )
            assert zero2["per_gpu"]["base_weights"] / r["per_gpu"]["base_weights"] == pytest.approx(
                r["world"], rel=1e-3
            )


def load_renderer() -> Any:
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the renderer imports its sibling doc_blocks
    spec = importlib.util.spec_from_file_location("render_scale_doc", ROOT / "benchmarks" / "render_scale_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_doc_block_is_what_the_committed_json_renders(tmp_path: Path) -> None:
    """docs/scale.md's generated block comes from benchmarks/results/scale_memory.json, and that JSON
    is what the script computes with its defaults (no hand-typed or stale figures)."""
    render = load_renderer()
    committed = json.loads((ROOT / "benchmarks" / "results" / "scale_memory.json").read_text())
    assert committed == json.loads(json.dumps(sm.report(sm.parse_args([]))))
    doc = (ROOT / "docs" / "scale.md").read_text()
    start, end = "<!-- scale-tables:start -->\n", "\n<!-- scale-tables:end -->"
    assert doc.split(start, 1)[1].split(end, 1)[0] == render.render(committed)
    copy = tmp_path / "scale.md"
    copy.write_text(f"before\n{start}stale{end}\nafter\n")
    render.main([str(ROOT / "benchmarks" / "results" / "scale_memory.json"), str(copy)])
    assert copy.read_text() == f"before\n{start}{render.render(committed)}{end}\nafter\n"
