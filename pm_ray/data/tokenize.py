"""Tokenisation and collation for causal LMs and encoders, and deterministic sharded batch streams.

Instruction rows become `prompt ids + answer ids + eos`; `labels` are -100 on the prompt and on
padding, so the loss is on the answer (and its end-of-sequence token) only. Training batches are
right-padded; generation prompts (see `encode_prompts`) are left-padded. Truncation is counted and
warned about (`TruncationWarning`), never silent.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from pm_ray.data.prompts import format_prompt
from pm_ray.data.schema import Task

IGNORE_INDEX = -100


class TruncationWarning(UserWarning):
    """Examples were longer than max_length and were cut."""


@dataclass
class TruncationStats:
    """Running count of encoded and truncated examples (one per task stream or per iterator)."""

    examples: int = 0
    truncated: int = 0

    def add(self, examples: int, truncated: int) -> None:
        self.examples += examples
        self.truncated += truncated


def pad_token_id(tokenizer: Any) -> int:
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an eos token")
    return int(pid)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def answer_ids(tokenizer: Any, answer: str) -> list[int]:
    """Token ids of an answer as it is trained and scored: the text followed by eos."""
    ids = _ids(tokenizer, answer)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def fit_pair(prompt: list[int], target: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    """Cut prompt (from the left, keeping the part next to the answer) and then target (from the
    right) so that len(prompt) + len(target) <= max_length. Returns (prompt, target, truncated)."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if len(prompt) + len(target) <= max_length:
        return prompt, target, False
    keep_prompt = max(max_length - len(target), max_length // 2, 1)
    prompt = prompt[-keep_prompt:]
    target = target[: max_length - len(prompt)]
    return prompt, target, True


def _warn_truncated(truncated: int, total: int, max_length: int) -> None:
    if truncated:
        warnings.warn(
            f"{truncated} of {total} examples were longer than max_length={max_length} and were truncated",
            TruncationWarning,
            stacklevel=3,
        )


def encode_examples(
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    max_length: int,
    kind: str,
    label_names: Sequence[str] | None = None,
    stats: TruncationStats | None = None,
) -> dict[str, Tensor]:
    """Encode rows into a right-padded training batch.

    instruction: input_ids, attention_mask, labels (-100 on prompt and padding).
    classification: input_ids, attention_mask, labels = class index in `label_names`.
    """
    if not rows:
        raise ValueError("encode_examples: no rows")
    if kind == "instruction":
        batch, truncated = _encode_instruction(tokenizer, rows, max_length)
    elif kind == "classification":
        if label_names is None:
            raise ValueError("encode_examples(kind='classification') needs label_names (the task's labels)")
        batch, truncated = _encode_classification(tokenizer, rows, max_length, list(label_names))
    else:
        raise ValueError(f"unknown task kind {kind!r}: expected 'instruction' or 'classification'")
    if stats is not None:
        stats.add(len(rows), truncated)
    _warn_truncated(truncated, len(rows), max_length)
    return batch


def _encode_instruction(
    tokenizer: Any, rows: Sequence[Mapping[str, Any]], max_length: int
) -> tuple[dict[str, Tensor], int]:
    seqs: list[tuple[list[int], list[int]]] = []
    truncated = 0
    for row in rows:
        prompt, target, cut = fit_pair(
            _ids(tokenizer, format_prompt(tokenizer, row)), answer_ids(tokenizer, str(row["output"])), max_length
        )
        truncated += cut
        seqs.append((prompt, target))
    return collate_pairs(seqs, pad_token_id(tokenizer)), truncated


def collate_pairs(seqs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad (prompt, target) id pairs into input_ids / attention_mask / labels."""
    width = max(len(p) + len(t) for p, t in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for i, (p, t) in enumerate(seqs):
        n = len(p) + len(t)
        input_ids[i, :n] = torch.tensor(p + t, dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, len(p) : n] = torch.tensor(t, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _encode_classification(
    tokenizer: Any, rows: Sequence[Mapping[str, Any]], max_length: int, label_names: list[str]
) -> tuple[dict[str, Tensor], int]:
    index = {name: i for i, name in enumerate(label_names)}
    texts = [str(r["text"]) for r in rows]
    full = tokenizer(texts, add_special_tokens=True)["input_ids"]
    truncated = sum(len(ids) > max_length for ids in full)
    enc = tokenizer(
        texts, add_special_tokens=True, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
    )
    try:
        labels = torch.tensor([index[str(r["label"])] for r in rows], dtype=torch.long)
    except KeyError as e:
        raise ValueError(f"label {e.args[0]!r} is not one of the task's labels {label_names}") from None
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}, truncated


def prompt_ids(
    tokenizer: Any, rows: Sequence[Mapping[str, Any]], *, max_length: int, stats: TruncationStats | None = None
) -> list[list[int]]:
    """Each row's prompt ids (prompts longer than max_length keep their end, with a warning)."""
    prompts = [_ids(tokenizer, format_prompt(tokenizer, r)) for r in rows]
    truncated = sum(len(p) > max_length for p in prompts)
    if stats is not None:
        stats.add(len(rows), truncated)
    _warn_truncated(truncated, len(rows), max_length)
    return [p[-max_length:] for p in prompts]


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask) [B, longest]: each sequence at the right end of its row."""
    width = max(len(q) for q in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, q in enumerate(seqs):
        input_ids[i, width - len(q) :] = torch.tensor(list(q), dtype=torch.long)
        attention_mask[i, width - len(q) :] = 1
    return input_ids, attention_mask


def encode_prompts(
    tokenizer: Any, rows: Sequence[Mapping[str, Any]], *, max_length: int, stats: TruncationStats | None = None
) -> dict[str, Tensor]:
    """Left-padded prompt batch for generation (prompts longer than max_length keep their end)."""
    prompts = prompt_ids(tokenizer, rows, max_length=max_length, stats=stats)
    input_ids, attention_mask = left_pad(prompts, pad_token_id(tokenizer))
    return {"input_ids": input_ids, "attention_mask": attention_mask}


# ---------------------------------------------------------------------------------------------
# Deterministic sharded batch streams


def shard_indices(num_rows: int, rank: int, world_size: int) -> np.ndarray:
    """Rows of `rank` among `world_size` (round robin): rank r gets r, r + W, r + 2W, ..."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return np.arange(rank, num_rows, world_size)


def epoch_order(num_rows: int, *, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """Row indices of `rank` for one epoch: a global permutation seeded by (seed, epoch), sharded
    round robin, so that ranks see disjoint rows and every epoch a different split of them."""
    perm = np.random.default_rng([seed, epoch]).permutation(num_rows)
    return perm[shard_indices(num_rows, rank, world_size)]


def task_batch_seed(seed: int, task: int) -> int:
    """The seed of task ``task``'s (1-based) training batch order in a run with trainer.seed ``seed``."""
    return seed * 1009 + task


def batch_rows(num_rows: int, *, batch_size: int, rank: int, world_size: int, seed: int) -> Iterator[list[int]]:
    """Endless stream of this rank's batches as row indices, reshuffled (seeded) every epoch.

    Batches are always full: an epoch's tail continues into the next epoch's order.
    """
    pending: list[int] = []
    epoch = 0
    while True:
        while len(pending) < batch_size:
            pending.extend(epoch_order(num_rows, seed=seed, epoch=epoch, rank=rank, world_size=world_size).tolist())
            epoch += 1
        take, pending = pending[:batch_size], pending[batch_size:]
        yield take


def training_rows(
    num_rows: int, *, batch_size: int, num_batches: int, rank: int, world_size: int, seed: int
) -> list[int]:
    """The rows of this rank's first ``num_batches`` batches, in training order: what a rank trains
    on in one task (``num_batches`` = trainer.steps_per_task), as the Ray Data loader ships it."""
    rows: list[int] = []
    batches = batch_rows(num_rows, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed)
    for _ in range(num_batches):
        rows.extend(next(batches))
    return rows


def _split_table(task: Task, split: str):
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return task.train if split == "train" else task.test


def check_batch_feed(task: Task, split: str, *, batch_size: int, world_size: int) -> None:
    """A split that can give every rank full batches (what `batch_iterator` and the Ray Data loader need)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = _split_table(task, split).num_rows
    if rows < world_size:
        raise ValueError(f"task {task.name!r} {split}: {rows} rows cannot feed {world_size} ranks")


def batch_iterator(
    task: Task,
    tokenizer: Any,
    *,
    batch_size: int,
    max_length: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    split: str = "train",
    stats: TruncationStats | None = None,
) -> Iterator[dict[str, Tensor]]:
    """Endless stream of encoded batches over this rank's shard, reshuffled (seeded) every epoch.

    Batches are always full: an epoch's tail continues into the next epoch's order (`batch_rows`).
    """
    check_batch_feed(task, split, batch_size=batch_size, world_size=world_size)
    table = _split_table(task, split)
    for take in batch_rows(table.num_rows, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed):
        rows = table.take(take).to_pylist()
        yield encode_examples(
            tokenizer, rows, max_length=max_length, kind=task.kind, label_names=task.labels, stats=stats
        )


class BatchDigest:
    """sha256 over every batch a rank trained on, in order (names, shapes and token ids): two runs
    whose digests agree trained on identical batches, whichever loader made them."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()

    def add(self, batch: Mapping[str, Tensor]) -> None:
        for name in sorted(batch):
            value = batch[name].detach().cpu().to(torch.long).contiguous()
            self._sha.update(f"{name}{tuple(value.shape)}".encode())
            self._sha.update(value.numpy().tobytes())

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def fisher_batches(
    task: Task,
    tokenizer: Any,
    *,
    num_samples: int,
    batch_size: int,
    max_length: int,
    rank: int = 0,
    world_size: int = 1,
    stats: TruncationStats | None = None,
) -> Iterator[dict[str, Tensor]]:
    """Finite batches over this rank's share of the first `num_samples` training rows (in file
    order); the ranks' shares are disjoint and together cover exactly those rows."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}")
    n = min(num_samples, task.train.num_rows)
    mine = shard_indices(n, rank, world_size).tolist()
    for start in range(0, len(mine), batch_size):
        rows = task.train.take(mine[start : start + batch_size]).to_pylist()
        yield encode_examples(
            tokenizer, rows, max_length=max_length, kind=task.kind, label_names=task.labels, stats=stats
        )
