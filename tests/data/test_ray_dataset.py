from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from pm_ray.data.readers import make_task
from pm_ray.data.tokenize import encode_examples
from pm_ray.models.tiny_tokenizer import tiny_llama_tokenizer

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, address="local")
    yield ray
    if started:
        ray.shutdown()


def test_map_batches_tokenisation_equals_single_process_encoding(ray_local, tmp_path):
    import pyarrow.parquet as pq

    from pm_ray.data.ray_dataset import iter_shard_batches, read_task_parquet, tokenized_dataset

    rows = [
        {"instruction": f"Count to {i}", "input": "x" * (i % 5), "output": " ".join(map(str, range(i)))}
        for i in range(1, 13)
    ]
    task = make_task("count", "instruction", pa.Table.from_pylist(rows), pa.Table.from_pylist(rows[:2]))
    pq.write_table(task.train, tmp_path / "train.parquet")
    tok = tiny_llama_tokenizer()
    ds = tokenized_dataset(
        read_task_parquet(str(tmp_path / "train.parquet")), tok, max_length=96, kind="instruction", batch_size=5
    )
    shards = ds.split(2, equal=True)
    got = [b for shard in shards for b in iter_shard_batches(shard, batch_size=3)]
    assert sum(b["input_ids"].shape[0] for b in got) == 12
    # Every tokenised row equals the single-process encoding of the same row.
    expected = {}
    for r in task.train.to_pylist():
        enc = encode_examples(tok, [r], max_length=96, kind="instruction")
        expected[tuple(enc["input_ids"][0].tolist())] = enc["labels"][0].tolist()
    for batch in got:
        for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
            n = int(mask.sum())
            assert tuple(ids[:n].tolist()) in expected
            assert labels[:n].tolist() == expected[tuple(ids[:n].tolist())]
            assert torch.all(labels[n:] == -100)
