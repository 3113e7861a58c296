"""Losses from the answer positions' logits against Hugging Face's loss over the full logits."""

from __future__ import annotations

import torch

from pm_ray.core.answer_logits import answer_logits, answer_mask, takes_logits_mask
from pm_ray.core.fisher import per_example_loss


def _inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def test_mask_marks_the_positions_that_predict_an_answer_token():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, -100]])
    assert answer_mask(labels).tolist() == [
        [False, True, True, False, False],
        [True, False, False, False, False],
    ]


def test_mean_loss_and_its_gradient_equal_hf_loss(tiny_llama_lora, make_causal_lm_batch):
    batch = make_causal_lm_batch(n=5)
    params = [p for p in tiny_llama_lora.parameters() if p.requires_grad]
    hf = tiny_llama_lora(**batch).loss
    hf_grads = torch.autograd.grad(hf, params)
    for sliced in (True, False):
        ours = answer_logits(tiny_llama_lora, _inputs(batch), batch["labels"], sliced=sliced)
        assert ours.logits.shape == (int((batch["labels"][:, 1:] != -100).sum()), 128)
        loss = ours.mean_loss()
        torch.testing.assert_close(loss, hf, rtol=1e-6, atol=1e-6)
        for g, ref in zip(torch.autograd.grad(loss, params), hf_grads):
            torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7)


def test_per_example_loss_equals_the_full_logits_one(tiny_llama_lora, make_causal_lm_batch):
    batch = make_causal_lm_batch(n=4)
    batch["labels"][2] = -100  # an example without target tokens: loss 0, as per_example_loss
    with torch.no_grad():
        full = per_example_loss(tiny_llama_lora(**_inputs(batch)).logits, batch["labels"], "causal_lm")
        ours = answer_logits(tiny_llama_lora, _inputs(batch), batch["labels"]).per_example_loss(4)
    assert ours[2] == 0.0
    torch.testing.assert_close(ours, full, rtol=1e-6, atol=1e-6)


def test_which_models_take_the_mask(tiny_llama_lora, tiny_gpt2_lora, tiny_bert_lora):
    assert takes_logits_mask(tiny_llama_lora) and takes_logits_mask(tiny_gpt2_lora)
    assert not takes_logits_mask(tiny_bert_lora)
