"""TaskHeadClassifier's active-task forward against literal computations on tiny:bert."""

from __future__ import annotations

import pytest
import torch

from pm_ray.models.backbone import load_backbone


@pytest.fixture()
def classifier():
    model, tok = load_backbone("tiny:bert", kind="classification")
    model.add_task("a", ["x", "y", "z"], seed=1)
    model.add_task("b", ["p", "q"], seed=2)
    model.add_task("c", ["u", "v"], seed=3)
    enc = tok(["one two", "three four five", "six"], padding=True, return_tensors="pt")
    return model, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def test_active_task_own_and_over_seen_logits_and_loss(classifier) -> None:
    model, inputs = classifier
    model.eval()
    labels = torch.tensor([1, 0, 1])
    with torch.no_grad():
        feats = model.features(**inputs)
        z = {name: head(feats) for name, head in model.heads.items()}
        model.active_task = "b"
        model.over_seen = False
        own = model(**inputs, labels=labels)
        assert torch.allclose(own.logits, z["b"])
        assert torch.allclose(own.loss, torch.nn.functional.cross_entropy(z["b"], labels))
        model.over_seen = True
        seen = model(**inputs, labels=labels)
        literal = torch.cat([z["b"], z["a"], z["c"]], dim=-1)  # the active head's classes first
        assert torch.allclose(seen.logits, literal)
        assert torch.allclose(seen.loss, -torch.log_softmax(literal, -1)[torch.arange(3), labels].mean())
        # an explicit task=None is the evaluation's concatenation in head order, whatever is active
        assert torch.allclose(model(**inputs, task=None).logits, torch.cat([z["a"], z["b"], z["c"]], -1))
        assert torch.allclose(model(**inputs, task="c").logits, z["c"])
        model.active_task = None
        assert torch.allclose(model(**inputs).logits, torch.cat([z["a"], z["b"], z["c"]], -1))
