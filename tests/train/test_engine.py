"""trainer.precision: `auto` resolves on the worker's own hardware (pm_ray/train/engine.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pm_ray.config_sections import TrainerSection
from pm_ray.train.engine import autocast_device, native_bf16, resolved_precision


def cpuinfo_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads the CPU flags from Linux /proc/cpuinfo")
def test_native_bf16_on_cpu_is_what_the_cpu_flags_say() -> None:
    """The kernel's CPUID flags are the reference: AMX tiles or AVX512-BF16 mean bf16 in hardware."""
    flags = cpuinfo_flags()
    assert native_bf16("cpu") == bool({"amx_tile", "avx512_bf16"} & flags)


def test_auto_is_bf16_mixed_exactly_where_bf16_is_native() -> None:
    auto = TrainerSection(precision="auto")
    native = native_bf16("cpu")
    assert resolved_precision(auto) == ("bf16-mixed" if native else "fp32")
    assert autocast_device(auto, bf16=False) == ("cpu" if native else None)
    # explicit settings are kept as given, whatever the hardware
    assert resolved_precision(TrainerSection(precision="fp32")) == "fp32"
    assert autocast_device(TrainerSection(precision="bf16-mixed"), bf16=False) == "cpu"
    assert autocast_device(TrainerSection(precision="fp32"), bf16=False) is None
    assert autocast_device(TrainerSection(precision="fp32"), bf16=True) == "cpu"  # bf16 weights: autocast


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_on_a_bf16_gpu_is_bf16_mixed() -> None:
    cfg = TrainerSection(precision="auto", use_gpu=True)
    assert resolved_precision(cfg) == ("bf16-mixed" if torch.cuda.is_bf16_supported() else "fp32")
