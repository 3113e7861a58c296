"""Ray Data path: a task split as a Ray Dataset, tokenised with `map_batches`, fed to Ray Train
workers as dataset shards. Uses the same encoding as the single-process path (`encode_examples`).

Rows are padded to `max_length` inside `map_batches` so every block has the same tensor shape;
`trim_padding` cuts a collated batch back to its longest row.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from pm_ray.data.schema import Task
from pm_ray.data.tokenize import IGNORE_INDEX, encode_examples, pad_token_id

TOKEN_COLUMNS: tuple[str, ...] = ("input_ids", "attention_mask", "labels")


def task_dataset(task: Task, split: str = "train") -> Any:
    """The split's Arrow table as a `ray.data.Dataset` (no copy through Python objects)."""
    import ray.data

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return ray.data.from_arrow(task.train if split == "train" else task.test)


def read_task_parquet(paths: str | Sequence[str]) -> Any:
    """Read (already validated) task Parquet files, e.g. a suite cache, as a Ray Dataset."""
    import ray.data

    return ray.data.read_parquet(paths)


def encode_block(
    batch: pa.Table, *, tokenizer: Any, max_length: int, kind: str, label_names: list[str] | None
) -> dict[str, np.ndarray]:
    """`map_batches` function: encode a block and pad it to exactly `max_length` columns."""
    enc = encode_examples(tokenizer, batch.to_pylist(), max_length=max_length, kind=kind, label_names=label_names)
    pad = max_length - enc["input_ids"].shape[1]
    fill = {"input_ids": pad_token_id(tokenizer), "attention_mask": 0, "labels": IGNORE_INDEX}
    out = {}
    for name, value in enc.items():
        if value.dim() == 2 and pad > 0:
            value = torch.nn.functional.pad(value, (0, pad), value=fill[name])
        out[name] = value.numpy()
    return out


def tokenized_dataset(
    ds: Any, tokenizer: Any, *, max_length: int, kind: str, label_names: list[str] | None = None, batch_size: int = 256
) -> Any:
    """Tokenise a Ray Dataset of task rows with `map_batches` (lazy, streaming)."""
    return ds.map_batches(
        encode_block,
        batch_size=batch_size,
        batch_format="pyarrow",
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "kind": kind, "label_names": label_names},
    )


def trim_padding(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop the padding columns that every row of a right-padded batch shares."""
    width = int(batch["attention_mask"].sum(dim=1).max())
    return {k: (v[:, :width] if v.dim() == 2 else v) for k, v in batch.items()}


def iter_shard_batches(shard: Any, *, batch_size: int) -> Iterator[dict[str, Tensor]]:
    """Batches from a `ray.train.get_dataset_shard(...)` iterator (or any Dataset), trimmed."""
    for batch in shard.iter_torch_batches(batch_size=batch_size, dtypes=torch.long):
        yield trim_padding({k: batch[k] for k in TOKEN_COLUMNS if k in batch})
