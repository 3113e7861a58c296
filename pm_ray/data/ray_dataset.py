"""Ray Data path: a task split as a Ray Dataset, tokenised with `map_batches`, fed to Ray Train
workers as dataset shards. Uses the same encoding as the single-process path (`encode_examples`).

Rows are padded to `max_length` inside `map_batches` so every block has the same tensor shape;
`trim_padding` cuts a collated batch back to its longest row.

`trainer.data_loader: ray_data` (pipeline `_fit`) gives the TorchTrainer one dataset per (task, rank),
`rank_training_dataset`: exactly the rows `batch_iterator` would give that rank, in its order, so the
batches (and a run's results) do not depend on the loader. No dataset is split by Ray Train
(`training_data_config`): which rows a rank gets is decided here, by `training_rows`, not by Ray
Data's OutputSplitter (which "does not provide any ordering guarantees", ray/data/_internal/
execution/operators/output_splitter.py), and `preserve_order` keeps the map's output blocks in input
order (MapOperator.start: a ReorderingBundleQueue instead of a FIFO one).
"""

from __future__ import annotations

import threading
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from pm_ray.data.schema import Task
from pm_ray.data.tokenize import IGNORE_INDEX, check_batch_feed, encode_examples, pad_token_id, training_rows

TOKEN_COLUMNS: tuple[str, ...] = ("input_ids", "attention_mask", "labels")

# The tokenising tasks of the training datasets ask Ray for no CPU: the worker group holds its
# cpus_per_worker for the whole run, and on a machine it fills (2 workers x 1 CPU on 2 CPUs) a task
# asking for one would wait forever. Their work is what the local loader does inside the training
# process (each rank's rows of one task, once): one task per dataset (TRAIN_TOKENIZE_TASKS; a
# dataset is one block), and a rank reads its datasets one task after the other, opening the next
# task's while it trains (RankTrainingShards), so at most two tokenising tasks per rank at a time.
TRAIN_TOKENIZE_CPUS = 0.0
TRAIN_TOKENIZE_TASKS = 1


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
    ds: Any,
    tokenizer: Any,
    *,
    max_length: int,
    kind: str,
    label_names: list[str] | None = None,
    batch_size: int = 256,
    num_cpus: float | None = None,
    max_tasks: int | None = None,
) -> Any:
    """Tokenise a Ray Dataset of task rows with `map_batches` (lazy, streaming). ``num_cpus``: what
    each task asks Ray for (None: Ray Data's default, 1); ``max_tasks``: at most this many at once."""
    from ray.data import TaskPoolStrategy

    return ds.map_batches(
        encode_block,
        batch_size=batch_size,
        batch_format="pyarrow",
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "kind": kind, "label_names": label_names},
        num_cpus=num_cpus,
        compute=TaskPoolStrategy(size=max_tasks),
    )


def train_dataset_name(task: int, rank: int) -> str:
    """The name of rank ``rank``'s training dataset of task ``task`` (1-based) on the TorchTrainer."""
    return f"task{task}_rank{rank}"


def rank_training_dataset(
    task: Task,
    tokenizer: Any,
    *,
    rank: int,
    world_size: int,
    seed: int,
    batch_size: int,
    num_batches: int,
    max_length: int,
) -> Any:
    """The tokenised rows rank ``rank`` trains on in ``task``, in training order: the first
    ``num_batches`` batches of `batch_iterator` with the same arguments, ``batch_size`` rows each."""
    import ray.data

    check_batch_feed(task, "train", batch_size=batch_size, world_size=world_size)
    rows = training_rows(
        task.train.num_rows,
        batch_size=batch_size,
        num_batches=num_batches,
        rank=rank,
        world_size=world_size,
        seed=seed,
    )
    # from_blocks: one block, whose metadata is read here; from_arrow reads it in a 1-CPU Ray task,
    # which waits as long as other work holds every CPU (other trials' workers in a Tune search)
    dataset = tokenized_dataset(
        ray.data.from_blocks([task.train.take(rows)]),
        tokenizer,
        max_length=max_length,
        kind=task.kind,
        label_names=task.labels,
        batch_size=batch_size,
        num_cpus=TRAIN_TOKENIZE_CPUS,
        max_tasks=TRAIN_TOKENIZE_TASKS,
    )
    dataset.context.enable_progress_bars = False  # a bar per task and rank in the worker logs; the run has its own
    return dataset


def training_data_config() -> Any:
    """Ray Train's DataConfig for the `rank_training_dataset`s: none is split (each already holds
    one rank's rows), and blocks keep their order through the map."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    return DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True))


def trim_padding(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop the padding columns that every row of a right-padded batch shares."""
    width = int(batch["attention_mask"].sum(dim=1).max())
    return {k: (v[:, :width] if v.dim() == 2 else v) for k, v in batch.items()}


def iter_shard_batches(shard: Any, *, batch_size: int) -> Iterator[dict[str, Tensor]]:
    """Batches from a `ray.train.get_dataset_shard(...)` iterator (or any Dataset), trimmed."""
    for batch in shard.iter_torch_batches(batch_size=batch_size, dtypes=torch.long):
        yield trim_padding({k: batch[k] for k in TOKEN_COLUMNS if k in batch})


class RankTrainingShards:
    """This rank's training datasets on the TorchTrainer (`train_dataset_name(t, rank)`), read with
    ``ray.train.get_dataset_shard`` one task after the other.

    Reading a dataset starts its Ray Data work: a Ray worker process for its tokenising task (while
    the worker group holds every CPU, Ray keeps no idle process from one task to the next, so each
    task pays a process start: seconds), then the tokenisation. So the next task's dataset is opened
    as soon as a task's batches are handed out, and its first batch is pulled in a background thread
    while this task trains; the first task's is pulled from the constructor on, while the model loads.
    """

    def __init__(self, rank: int, batch_size: int, first_task: int, last_task: int) -> None:
        self._rank = rank
        self._batch_size = batch_size
        self._last_task = last_task
        self._opened: dict[int, tuple[threading.Thread, dict[str, Any]]] = {}
        self._reading: Iterator[dict[str, Tensor]] | None = None
        if first_task <= last_task:
            self._open(first_task)

    def _open(self, t: int) -> None:
        import ray.train

        shard = ray.train.get_dataset_shard(train_dataset_name(t, self._rank))
        batches = iter_shard_batches(shard, batch_size=self._batch_size)
        pulled: dict[str, Any] = {"batches": batches}

        def pull_first() -> None:
            try:
                pulled["first"] = next(batches)
            except BaseException as err:  # noqa: BLE001  (re-raised where the batches are used)
                pulled["error"] = err

        thread = threading.Thread(target=pull_first, name=f"ray-data-task{t}", daemon=True)
        thread.start()
        self._opened[t] = (thread, pulled)

    def batches(self, t: int) -> Iterator[dict[str, Tensor]]:
        """Task ``t``'s batches, in order; opens task t + 1's dataset."""
        if self._reading is not None:  # the last task's: its Ray Data execution ends, its blocks are freed
            self._reading.close()
        if t not in self._opened:
            self._open(t)
        thread, pulled = self._opened.pop(t)
        if t + 1 <= self._last_task and t + 1 not in self._opened:
            self._open(t + 1)
        self._reading = self._after(thread, pulled)
        return self._reading

    @staticmethod
    def _after(thread: threading.Thread, pulled: dict[str, Any]) -> Iterator[dict[str, Tensor]]:
        thread.join()
        if "error" in pulled:
            raise pulled["error"]
        batches = pulled["batches"]
        try:
            yield pulled["first"]
            yield from batches
        finally:
            batches.close()


def load_tokenizer(name_or_path: str) -> Any:
    """The tokenizer `load_backbone(name_or_path)` gives, without building the model: the driver
    tokenises for the Ray Data loader and must not hold a large backbone. Same sources, same order
    (pm_ray/models/backbone.py; equal token ids: tests/data/test_ray_loader.py)."""
    from transformers import AutoTokenizer

    from pm_ray.models import backbone
    from pm_ray.models.tiny_tokenizer import tiny_bert_tokenizer, tiny_llama_tokenizer

    ref = str(name_or_path).strip()
    if ref.startswith("tiny:"):
        tiny = {"tiny:llama": tiny_llama_tokenizer, "tiny:bert": tiny_bert_tokenizer}
        if ref not in tiny:
            raise backbone.BackboneError(f"unknown tiny model {ref!r}: expected 'tiny:llama' or 'tiny:bert'")
        return tiny[ref]()
    source, options = ref, {}
    if ref.startswith("bundled:"):
        name = ref[len("bundled:") :]
        model_dir, entry = backbone.bundled_model_dir(name)
        source = str(model_dir)
        if entry.gguf_file:
            converted = backbone.converted_bundled_dir(name, model_dir / entry.gguf_file)
            source, options = (str(converted), {}) if converted else (source, {"gguf_file": entry.gguf_file})
    tokenizer = AutoTokenizer.from_pretrained(source, **options)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
