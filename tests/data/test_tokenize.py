from __future__ import annotations

import warnings

import pyarrow as pa
import pytest
import torch

from pm_ray.data.prompts import format_prompt
from pm_ray.data.readers import make_task
from pm_ray.data.tokenize import (
    IGNORE_INDEX,
    TruncationStats,
    TruncationWarning,
    batch_iterator,
    encode_examples,
    encode_prompts,
    fisher_batches,
)
from pm_ray.models.tiny_tokenizer import TINY_CHAT_TEMPLATE, tiny_llama_tokenizer

ROWS = [
    {"instruction": "Reverse the words.", "input": "one two three", "output": "three two one"},
    {"instruction": "Say yes.", "input": "", "output": "yes"},
]


@pytest.fixture(scope="module")
def tok():
    return tiny_llama_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    return tiny_llama_tokenizer(chat_template=TINY_CHAT_TEMPLATE)


def numbered_task(n_train: int, n_test: int = 4, kind: str = "instruction") -> object:
    train = pa.table({"instruction": [f"row {i}" for i in range(n_train)], "output": [str(i) for i in range(n_train)]})
    test = pa.table({"instruction": [f"test {i}" for i in range(n_test)], "output": ["x"] * n_test})
    return make_task("numbers", kind, train, test)


def test_plain_template_formatting(tok):
    assert format_prompt(tok, ROWS[0]) == (
        "<s>### Instruction:\nReverse the words.\n\n### Input:\none two three\n\n### Response:\n"
    )
    assert format_prompt(tok, ROWS[1]) == "<s>### Instruction:\nSay yes.\n\n### Response:\n"


def test_chat_template_formatting(chat_tok):
    assert format_prompt(chat_tok, ROWS[0]) == "<|user|>Reverse the words.\n\none two three</s><|assistant|>"
    assert format_prompt(chat_tok, ROWS[1]) == "<|user|>Say yes.</s><|assistant|>"


@pytest.mark.parametrize("which", ["plain", "chat"])
def test_labels_mask_prompt_and_padding(which, tok, chat_tok):
    t = tok if which == "plain" else chat_tok
    batch = encode_examples(t, ROWS, max_length=256, kind="instruction")
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    for i, row in enumerate(ROWS):
        prompt_ids = t(format_prompt(t, row), add_special_tokens=False)["input_ids"]
        answer = t(row["output"], add_special_tokens=False)["input_ids"] + [t.eos_token_id]
        n = len(prompt_ids) + len(answer)
        assert batch["input_ids"][i, :n].tolist() == prompt_ids + answer  # right padding, prompt first
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        expected = [IGNORE_INDEX] * len(prompt_ids) + answer + [IGNORE_INDEX] * (batch["labels"].shape[1] - n)
        assert batch["labels"][i].tolist() == expected
        kept = batch["labels"][i][batch["labels"][i] != IGNORE_INDEX].tolist()
        assert t.decode(kept, skip_special_tokens=True) == row["output"]


def test_loss_only_counts_answer_tokens(tok):
    """The model's loss with these labels equals a brute-force mean over answer tokens only."""
    from pm_ray.models.backbone import load_backbone

    model, _ = load_backbone("tiny:llama")
    batch = encode_examples(tok, ROWS, max_length=256, kind="instruction")
    loss = model(**batch).loss
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    terms = []
    for i in range(len(ROWS)):
        for pos in range(1, batch["input_ids"].shape[1]):
            if batch["labels"][i, pos] != IGNORE_INDEX:
                terms.append(-torch.log_softmax(logits[i, pos - 1], -1)[batch["labels"][i, pos]])
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-5)


def test_truncation_is_reported_and_keeps_answer(tok):
    stats = TruncationStats()
    long_row = {"instruction": "x" * 200, "input": "", "output": "ok"}
    with pytest.warns(TruncationWarning, match="1 of 2 examples were longer than max_length=64"):
        batch = encode_examples(tok, [long_row, ROWS[1]], max_length=64, kind="instruction", stats=stats)
    assert (stats.examples, stats.truncated) == (2, 1)
    assert batch["input_ids"].shape[1] == 64
    kept = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    assert kept == tok("ok", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_examples(tok, ROWS, max_length=256, kind="instruction")


def test_prompts_are_left_padded(tok):
    enc = encode_prompts(tok, ROWS, max_length=256)
    short = tok(format_prompt(tok, ROWS[1]), add_special_tokens=False)["input_ids"]
    width = enc["input_ids"].shape[1]
    assert enc["input_ids"][1, width - len(short) :].tolist() == short
    assert enc["attention_mask"][1].tolist() == [0] * (width - len(short)) + [1] * len(short)


def test_classification_encoding(tok):
    rows = [{"text": "good", "label": "pos"}, {"text": "bad movie", "label": "neg"}]
    batch = encode_examples(tok, rows, max_length=32, kind="classification", label_names=["neg", "pos"])
    assert batch["labels"].tolist() == [1, 0]
    with pytest.raises(ValueError, match="needs label_names"):
        encode_examples(tok, rows, max_length=32, kind="classification")


def _row_ids(batch, tok) -> list[int]:
    """Recover the training-row number from each example's answer tokens."""
    out = []
    for labels in batch["labels"]:
        out.append(int(tok.decode(labels[labels != IGNORE_INDEX].tolist(), skip_special_tokens=True)))
    return out


def test_batch_iterator_is_deterministic_and_shards_are_disjoint(tok):
    task = numbered_task(10)
    epoch_rows = {}
    for rank in range(2):
        it = batch_iterator(task, tok, batch_size=5, max_length=64, rank=rank, world_size=2, seed=3)
        first = _row_ids(next(it), tok)
        again = _row_ids(
            next(batch_iterator(task, tok, batch_size=5, max_length=64, rank=rank, world_size=2, seed=3)), tok
        )
        assert first == again
        epoch_rows[rank] = first
    assert sorted(epoch_rows[0] + epoch_rows[1]) == list(range(10))  # one epoch: each row once overall


def test_batch_iterator_cycles_and_reshuffles(tok):
    task = numbered_task(6)
    it = batch_iterator(task, tok, batch_size=3, max_length=64, seed=0)
    seen = [_row_ids(next(it), tok) for _ in range(8)]  # 4 epochs
    epochs = [seen[2 * e] + seen[2 * e + 1] for e in range(4)]
    assert all(sorted(e) == list(range(6)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled per epoch
    other = batch_iterator(task, tok, batch_size=3, max_length=64, seed=1)
    assert [_row_ids(next(other), tok) for _ in range(8)] != seen


def test_fisher_batches_cover_first_rows_exactly_once(tok):
    task = numbered_task(20)
    covered = []
    for rank in range(3):
        for batch in fisher_batches(task, tok, num_samples=11, batch_size=2, max_length=64, rank=rank, world_size=3):
            assert batch["input_ids"].shape[0] <= 2
            covered.extend(_row_ids(batch, tok))
    assert sorted(covered) == list(range(11))
