"""The Ray Data loader's datasets (trainer.data_loader=ray_data, pm_ray/data/ray_dataset.py) give each
rank exactly the batches `batch_iterator` gives it, and are read without a free CPU."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from pm_ray.config import ConfigError, config_from_dict
from pm_ray.data.readers import make_task
from pm_ray.data.tokenize import BatchDigest, batch_iterator, encode_examples, training_rows
from pm_ray.models.tiny_tokenizer import tiny_llama_tokenizer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BATCH_SIZE = 4
NUM_BATCHES = 5  # 20 rows per rank from 13 rows on 2 ranks: every rank's rows span several epochs
MAX_LENGTH = 64


def count_task():
    rows = [
        {"instruction": f"Count to {i}", "input": "x" * (i % 5), "output": " ".join(map(str, range(i)))}
        for i in range(1, 14)
    ]
    return make_task("count", "instruction", pa.Table.from_pylist(rows), pa.Table.from_pylist(rows[:2]))


def test_training_rows_are_batch_iterators_rows_in_order() -> None:
    task = count_task()
    tok = tiny_llama_tokenizer()
    for rank in range(2):
        rows = training_rows(
            task.train.num_rows, batch_size=BATCH_SIZE, num_batches=NUM_BATCHES, rank=rank, world_size=2, seed=7
        )
        assert len(rows) == BATCH_SIZE * NUM_BATCHES
        batches = batch_iterator(
            task, tok, batch_size=BATCH_SIZE, max_length=MAX_LENGTH, rank=rank, world_size=2, seed=7
        )
        for start in range(0, len(rows), BATCH_SIZE):
            expected = encode_examples(
                tok,
                task.train.take(rows[start : start + BATCH_SIZE]).to_pylist(),
                max_length=MAX_LENGTH,
                kind="instruction",
            )
            batch = next(batches)
            assert all(torch.equal(batch[k], expected[k]) for k in expected)


def test_bad_data_loader_is_a_config_error_naming_the_field() -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict({"trainer": {"data_loader": "parquet"}})
    text = str(err.value)
    assert "trainer.data_loader" in text and "'local'" in text and "'ray_data'" in text, text


def test_rank_datasets_give_batch_iterators_batches_while_the_cpus_are_held(ray_session) -> None:
    """An actor holding all of the session's 2 CPUs (what a 2 x 1-CPU worker group holds) reads each
    rank's dataset: no hang (the tokenising tasks ask for 0 CPUs, the dataset is built without a Ray
    task), and the batches equal `batch_iterator`'s, tensor for tensor, in order."""
    ray = ray_session

    from pm_ray.data.ray_dataset import (
        iter_shard_batches,
        load_tokenizer,
        rank_training_dataset,
        training_data_config,
    )

    @ray.remote(num_cpus=2)
    class Reader:
        def read(self, datasets: dict) -> dict[str, list[dict[str, torch.Tensor]]]:
            # what Ray Train does with datasets excluded from splitting (DataConfig.configure)
            iterators = training_data_config().configure(
                datasets, world_size=1, worker_handles=None, worker_node_ids=None
            )
            return {name: list(iter_shard_batches(it, batch_size=BATCH_SIZE)) for name, it in iterators[0].items()}

    task = count_task()
    tok = load_tokenizer("tiny:llama")
    datasets = {
        f"rank{rank}": rank_training_dataset(
            task,
            tok,
            rank=rank,
            world_size=2,
            seed=7,
            batch_size=BATCH_SIZE,
            num_batches=NUM_BATCHES,
            max_length=MAX_LENGTH,
        )
        for rank in range(2)
    }
    reader = Reader.remote()
    got = ray.get(reader.read.remote(datasets), timeout=240)
    ray.kill(reader)
    for rank in range(2):
        expected = batch_iterator(
            task, tok, batch_size=BATCH_SIZE, max_length=MAX_LENGTH, rank=rank, world_size=2, seed=7
        )
        assert len(got[f"rank{rank}"]) == NUM_BATCHES
        digest_got, digest_expected = BatchDigest(), BatchDigest()
        for batch in got[f"rank{rank}"]:
            reference = next(expected)
            assert set(batch) == set(reference)
            for name, value in reference.items():
                assert torch.equal(batch[name], value), (rank, name)
            digest_got.add(batch)
            digest_expected.add(reference)
        assert digest_got.hexdigest() == digest_expected.hexdigest()


def test_load_tokenizer_is_the_backbones_tokenizer() -> None:
    from pm_ray.data.ray_dataset import load_tokenizer
    from pm_ray.models.backbone import load_backbone

    _, expected = load_backbone("tiny:llama")
    got = load_tokenizer("tiny:llama")
    text = "Count to 7: 0 1 2 3 4 5 6"
    assert got(text)["input_ids"] == expected(text)["input_ids"]
    assert (got.pad_token_id, got.eos_token_id) == (expected.pad_token_id, expected.eos_token_id)
