"""Per-module tensor dictionaries: validation, float64 reductions and atomic safetensors I/O.

Every quantity the core merges is a ``dict[str, Tensor]`` keyed by the base model's module name
(e.g. ``"model.layers.0.self_attn.k_proj"``) with tensors in the layout of that module's dense
weight. This file holds the checks and the durable I/O those dictionaries share.

A check is one read of the tensor; a merge hands the same Δ_t and F_t to two phases (partials,
then merge), so the checks take a :class:`CheckCache` that remembers which tensors passed.
Elementwise work over several such tensors goes slice by slice (:func:`sliced`), with its
products in one reused :class:`SliceBuffer`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

TensorDict = dict[str, torch.Tensor]


def check_same_layout(
    reference: Mapping[str, torch.Tensor],
    other: Mapping[str, torch.Tensor],
    *,
    reference_name: str,
    other_name: str,
) -> None:
    """Raise ValueError unless ``other`` has exactly the keys and shapes of ``reference``."""
    missing = sorted(set(reference) - set(other))
    extra = sorted(set(other) - set(reference))
    if missing or extra:
        raise ValueError(
            f"{other_name} does not match {reference_name}: "
            f"missing modules {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected modules {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    for key, tensor in reference.items():
        if tuple(other[key].shape) != tuple(tensor.shape):
            raise ValueError(
                f"{other_name}[{key!r}] has shape {tuple(other[key].shape)}, "
                f"expected {tuple(tensor.shape)} as in {reference_name}"
            )


def _min_max(tensor: torch.Tensor) -> tuple[float, float]:
    """(min, max) in one pass without a bool temporary; NaN anywhere makes both NaN, ±Inf shows in
    one of them, so both are finite exactly when every entry is (torch.aminmax propagates NaN)."""
    if tensor.numel() == 0:
        return 0.0, 0.0
    low, high = torch.aminmax(tensor.detach())
    return float(low), float(high)


class CheckCache:
    """The tensors that passed a check ("finite", "fisher"), so a tensor handed to both phases of a
    merge is read once.

    An entry is keyed by the check and the tensor's id and holds a weak reference (a new tensor
    that reuses a freed one's id never matches) and the tensor's version counter (an in-place
    change bumps it, so the tensor is checked again). Writes that bypass autograd's counter
    (``.data``, a shared numpy array) are not seen: hand the merge tensors you do not write to.
    Inference-mode tensors have no version counter and are checked every time.
    """

    def __init__(self) -> None:
        self._passed: dict[tuple[str, int], tuple[weakref.ref[torch.Tensor], int]] = {}

    @staticmethod
    def _version(tensor: torch.Tensor) -> int | None:
        try:
            return tensor._version
        except RuntimeError:  # an inference-mode tensor
            return None

    def passed(self, check: str, tensor: torch.Tensor) -> bool:
        entry = self._passed.get((check, id(tensor)))
        return entry is not None and entry[0]() is tensor and entry[1] == self._version(tensor)

    def add(self, check: str, tensor: torch.Tensor) -> None:
        version = self._version(tensor)
        if version is not None:
            self._passed[(check, id(tensor))] = (weakref.ref(tensor), version)

    def clear(self) -> None:
        self._passed.clear()


def check_finite(tensors: Mapping[str, torch.Tensor], *, name: str, cache: CheckCache | None = None) -> None:
    for key, tensor in tensors.items():
        if cache is not None and cache.passed("finite", tensor):
            continue
        if not all(map(math.isfinite, _min_max(tensor))):
            raise ValueError(f"{name}[{key!r}] contains NaN or Inf values")
        if cache is not None:
            cache.add("finite", tensor)


def check_fisher(fisher: Mapping[str, torch.Tensor], *, name: str = "fisher", cache: CheckCache | None = None) -> None:
    """A diagonal Fisher is finite and non-negative everywhere (one min/max pass per tensor)."""
    for key, tensor in fisher.items():
        if cache is not None and cache.passed("fisher", tensor):
            continue
        low, high = _min_max(tensor)
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"{name}[{key!r}] contains NaN or Inf values")
        if low < 0:
            raise ValueError(
                f"{name}[{key!r}] has negative entries (min {low:.3g}); "
                "a diagonal Fisher is a mean of squares and must be >= 0"
            )
        if cache is not None:
            cache.add("fisher", tensor)


# float64 copies are made a chunk at a time (at most 32 MiB each): whole modules of every model
# pm-ray adapts fit one chunk (converting a module at once is ~1.7x faster than 64k chunks), and an
# embedding-sized tensor never gets a float64 copy of its own
_DOT_CHUNK = 1 << 22


def dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    """Σ a ⊙ b in float64: exact products of float32 inputs, a float64 sum (the terms of α are
    differences of large sums)."""
    if a.shape != b.shape:
        raise ValueError(f"dot64: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    a, b = a.reshape(-1), b.reshape(-1)
    total = 0.0
    for start in range(0, a.numel(), _DOT_CHUNK):
        stop = start + _DOT_CHUNK
        total += float(torch.dot(a[start:stop].double(), b[start:stop].double()))
    return total


# Elementwise passes over several tensors go _SLICE entries at a time, so the slices one pass
# touches (inputs and products, ~8 in the P&M merge) stay in cache for the next pass. Whole
# SmolLM2 all-linear modules (3.4 MiB a tensor) did not: the P&M partials ran 1.2x slower on
# them than in slices of 2^17 (2^16: slower again, per-call overhead); k,v modules are one slice.
_SLICE = 1 << 17


def as_cpu32(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor itself when it is contiguous float32 on the CPU (the usual case), else a copy that is."""
    if tensor.dtype != torch.float32 or not tensor.is_cpu or not tensor.is_contiguous():
        tensor = tensor.detach().float().cpu().contiguous()
    return tensor


def sliced(*tensors: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """Same-shape contiguous tensors side by side, _SLICE entries at a time: themselves when they
    fit one slice, else flat views (so writes to a slice land in the tensor)."""
    if tensors[0].numel() <= _SLICE:
        yield tensors
        return
    flat = [t.view(-1) for t in tensors]
    for start in range(0, flat[0].numel(), _SLICE):
        yield tuple(t[start : start + _SLICE] for t in flat)


class SliceBuffer:
    """One reused float32 buffer for ``rows`` products of a slice: per slice shape, the (rows, n)
    block and its rows in that shape."""

    def __init__(self, rows: int, tensors: Mapping[str, torch.Tensor]) -> None:
        self.rows = rows
        self.data = torch.empty(
            rows * min(_SLICE, max((t.numel() for t in tensors.values()), default=0)), dtype=torch.float32
        )
        self.views: dict[torch.Size, tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = {}

    def __call__(self, shape: torch.Size) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        if shape not in self.views:
            block = self.data[: self.rows * shape.numel()]
            self.views[shape] = (block.view(self.rows, shape.numel()), block.view(self.rows, *shape).unbind(0))
        return self.views[shape]


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_tensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, object] | None = None
) -> None:
    """Atomically save tensors as safetensors; ``metadata`` is stored as one JSON string."""
    payload: TensorDict = {}
    seen: set[int] = set()
    for key, tensor in tensors.items():
        t = tensor.detach().contiguous().cpu()
        # safetensors refuses aliased tensors (e.g. merged is start_next for line merges)
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        payload[key] = t
    meta = {"pm_ray": json.dumps(dict(metadata or {}), sort_keys=True)}
    atomic_write_bytes(path, st_save(payload, metadata=meta))


def load_tensors(path: str | Path) -> tuple[TensorDict, dict[str, object]]:
    """Load a file written by :func:`save_tensors`: (tensors, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such safetensors file")
    with safe_open(str(path), framework="pt") as handle:
        raw = (handle.metadata() or {}).get("pm_ray", "{}")
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: metadata field 'pm_ray' is not valid JSON ({err})") from err
    return tensors, metadata


def split_prefixed(tensors: Mapping[str, torch.Tensor], prefix: str) -> TensorDict:
    """The sub-dictionary of ``"<prefix>/<key>"`` entries, with the prefix removed."""
    start = prefix + "/"
    return {key[len(start) :]: t for key, t in tensors.items() if key.startswith(start)}


def with_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> TensorDict:
    return {f"{prefix}/{key}": t for key, t in tensors.items()}
