"""Multiple-choice tasks: pick the choice with the highest length-normalised log-likelihood.

Score of a choice = mean log-probability of its answer tokens (the choice text followed by eos,
exactly what training puts the loss on) given the prompt. All (row, choice) pairs are flattened and
scored in right-padded batches: one forward per batch of pairs, no generation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from pm_ray.data.prompts import format_prompt
from pm_ray.data.tokenize import IGNORE_INDEX, answer_ids, collate_pairs, fit_pair, pad_token_id
from pm_ray.eval.rows import chunks, model_device


def sequence_mean_logprob(logits: Tensor, labels: Tensor) -> Tensor:
    """Per row: mean over label positions (!= -100) of log p(label_t | prefix). logits predict the
    next token (position t-1 scores label t)."""
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    token_lp = torch.zeros(shift_labels.shape, dtype=torch.float64, device=logits.device)
    selected = torch.log_softmax(shift_logits[mask].float(), dim=-1)
    token_lp[mask] = selected.gather(-1, shift_labels[mask].unsqueeze(-1)).squeeze(-1).double()
    return token_lp.sum(dim=1) / mask.sum(dim=1).clamp(min=1)


@torch.no_grad()
def choice_scores(model: nn.Module, tokenizer: Any, rows: list[dict[str, Any]], *, batch_size: int,
                  max_length: int) -> list[list[float]]:
    """Length-normalised log-likelihood of every choice of every row."""
    device = model_device(model)
    pad_id = pad_token_id(tokenizer)
    pairs: list[tuple[int, list[int], list[int]]] = []
    for i, row in enumerate(rows):
        prompt = list(tokenizer(format_prompt(tokenizer, row), add_special_tokens=False)["input_ids"])
        for choice in row["choices"]:
            p, t, _ = fit_pair(prompt, answer_ids(tokenizer, choice), max_length)
            pairs.append((i, p, t))
    scores: list[list[float]] = [[] for _ in rows]
    for batch in chunks(pairs, batch_size):
        enc = collate_pairs([(p, t) for _, p, t in batch], pad_id)
        logits = model(input_ids=enc["input_ids"].to(device),
                       attention_mask=enc["attention_mask"].to(device)).logits
        for (i, _, _), s in zip(batch, sequence_mean_logprob(logits, enc["labels"].to(device)).tolist()):
            scores[i].append(s)
    return scores


def count_choice_correct(scores: list[list[float]], rows: list[dict[str, Any]]) -> int:
    correct = 0
    for s, row in zip(scores, rows, strict=True):
        best = max(range(len(s)), key=lambda k: (s[k], -k))  # ties -> first choice
        correct += row["choices"][best] == row["output"]
    return correct
