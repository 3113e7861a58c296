from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from pm_ray.data.readers import make_task
from pm_ray.data.schema import Task
from pm_ray.eval import evaluate_task
from pm_ray.models.backbone import load_backbone
from pm_ray.models.lora import attach_lora


def cls_task(name: str, labels: list[str], n: int = 10):
    rows = [
        {"text": f"{name} example number {i}" + " pad" * (i % 3), "label": labels[i % len(labels)]} for i in range(n)
    ]
    train = pa.Table.from_pylist([{"text": f"train {name} {label}", "label": label} for label in labels])
    return make_task(name, "classification", train, pa.Table.from_pylist(rows))


@pytest.fixture(scope="module")
def two_task_model():
    model, tok = load_backbone("tiny:bert", kind="classification")
    a, b = cls_task("a", ["x", "y"]), cls_task("b", ["p", "q", "r"], n=9)
    model.add_task("a", a.labels)
    model.add_task("b", b.labels)
    with torch.no_grad():  # make heads non-trivial so that task-agnostic and task-aware differ
        for head in model.heads.values():
            head.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(7))
    return model, tok, a, b


def brute_force(model, tok, task, all_tasks):
    agnostic = aware = 0
    offset = sum(len(t.labels) for t in all_tasks[: [t.name for t in all_tasks].index(task.name)])
    for row in task.test.to_pylist():
        enc = tok([row["text"]], return_tensors="pt")
        with torch.no_grad():
            feats = model.features(enc["input_ids"], enc["attention_mask"])
            logits = torch.cat([model.heads[t.name](feats) for t in all_tasks], -1)[0]
        y = task.labels.index(row["label"])
        agnostic += int(logits.argmax()) == offset + y
        aware += int(logits[offset : offset + len(task.labels)].argmax()) == y
    return agnostic, aware


def test_task_agnostic_and_task_aware_accuracy_match_brute_force(two_task_model):
    model, tok, a, b = two_task_model
    for task in (a, b):
        got = evaluate_task(model, tok, task, batch_size=4)
        agnostic, aware = brute_force(model, tok, task, [a, b])
        assert (got["correct"], got["task_aware_correct"], got["total"]) == (agnostic, aware, task.test.num_rows)
        assert got["score"] == agnostic / task.test.num_rows
        assert got["task_aware_correct"] >= got["correct"]  # fewer classes to confuse


def test_classification_through_peft_and_shards(two_task_model):
    model, tok, a, b = two_task_model
    peft_model = attach_lora(model, rank=2, alpha=4, targets=None)
    single = evaluate_task(peft_model, tok, b, batch_size=3)
    shards = [evaluate_task(peft_model, tok, b, batch_size=2, rank=r, world_size=2) for r in range(2)]
    assert sum(s["correct"] for s in shards) == single["correct"]
    assert sum(s["task_aware_correct"] for s in shards) == single["task_aware_correct"]
    peft_model.unload()


def test_missing_head_is_a_clear_error():
    model, tok = load_backbone("tiny:bert", kind="classification")
    with pytest.raises(ValueError, match="no head for task 'a'"):
        evaluate_task(model, tok, cls_task("a", ["x", "y"]))


def test_training_a_task_head_reaches_its_training_data():
    """The per-task head path trains end to end: loss from labels, only that head moves."""
    from pm_ray.data.tokenize import batch_iterator

    model, tok = load_backbone("tiny:bert", kind="classification")
    a, b = cls_task("a", ["x", "y"]), cls_task("b", ["p", "q"])
    # Learnable from the text: each example names its label (random tiny encoder, 30 steps).
    rows = pa.Table.from_pylist(
        [{"text": f"{label} is the answer {i}", "label": label} for i, label in enumerate(["p", "q"] * 5)]
    )
    b = Task(name="b", kind="classification", train=rows, test=rows, labels=b.labels)
    model.add_task("a", a.labels)
    model.add_task("b", b.labels)
    peft_model = attach_lora(model, rank=4, alpha=8, targets=None)
    before_a = model.heads["a"].weight.detach().clone()
    opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=0.05)
    batches = batch_iterator(b, tok, batch_size=9, max_length=32, seed=0)
    losses = []
    for _ in range(30):
        out = peft_model(**next(batches), task="b")
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert torch.equal(model.heads["a"].weight, before_a)  # no gradient reaches another task's head
    assert evaluate_task(peft_model, tok, b)["task_aware_score"] >= 0.8
