"""Multiple-choice tasks: pick the choice with the highest length-normalised log-likelihood.

Score of a choice = mean log-probability of its answer tokens (the choice text followed by eos,
exactly what training puts the loss on) given the prompt.

`choice_scores` runs each row's prompt once (left-padded batch, KV cache kept) and scores all of
its choices from that cache: the prompt's last logits give the first choice token, one forward of
the choice tokens over a copy of the cache gives the rest. The tokens processed per row drop from
n_choices * (prompt + choice) to prompt + n_choices * choice. `pairwise_choice_scores` is the
plain form (one right-padded forward per (row, choice) pair), used for rows whose prompt would be
truncated differently per choice and as the reference the cached form is tested against.
"""

from __future__ import annotations

import copy
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
def choice_scores(
    model: nn.Module, tokenizer: Any, rows: list[dict[str, Any]], *, batch_size: int, max_length: int
) -> list[list[float]]:
    """Length-normalised log-likelihood of every choice of every row (prompt run once per row)."""
    scores: list[list[float]] = [[] for _ in rows]
    cached: list[tuple[int, list[int], list[list[int]]]] = []
    fallback: list[int] = []
    for i, row in enumerate(rows):
        prompt = list(tokenizer(format_prompt(tokenizer, row), add_special_tokens=False)["input_ids"])
        targets = [answer_ids(tokenizer, choice) for choice in row["choices"]]
        if len(prompt) + max(len(t) for t in targets) <= max_length:
            cached.append((i, prompt, targets))
        else:  # fit_pair would cut this prompt per choice: score those pairs one by one
            fallback.append(i)
    for batch in chunks(cached, batch_size):
        for (i, _, _), row_scores in zip(batch, _cached_batch_scores(model, tokenizer, batch, batch_size)):
            scores[i] = row_scores
    if fallback:
        for i, s in zip(
            fallback,
            pairwise_choice_scores(
                model, tokenizer, [rows[i] for i in fallback], batch_size=batch_size, max_length=max_length
            ),
        ):
            scores[i] = s
    return scores


def _cached_batch_scores(
    model: nn.Module, tokenizer: Any, batch: list[tuple[int, list[int], list[list[int]]]], pair_batch_size: int
) -> list[list[float]]:
    device = model_device(model)
    pad_id = pad_token_id(tokenizer)
    width = max(len(p) for _, p, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for b, (_, p, _) in enumerate(batch):
        input_ids[b, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        prompt_mask[b, width - len(p) :] = 1
    prompt_mask = prompt_mask.to(device)
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=input_ids.to(device),
        attention_mask=prompt_mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
    )  # only the last position: it predicts the first choice token
    first_lp = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)  # predicts each choice's first token
    lengths = prompt_mask.sum(-1)
    pairs = [(b, t) for b, (_, _, targets) in enumerate(batch) for t in targets]
    flat: list[float] = []
    for chunk in chunks(pairs, pair_batch_size):
        index = torch.tensor([b for b, _ in chunk], device=device)
        cache = copy.deepcopy(out.past_key_values)
        cache.batch_select_indices(index)
        longest = max(len(t) for _, t in chunk)
        ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), longest), dtype=torch.long)
        for k, (_, t) in enumerate(chunk):
            ids[k, : len(t)] = torch.tensor(t, dtype=torch.long)
            mask[k, : len(t)] = 1
        ids, mask = ids.to(device), mask.to(device)
        pos = lengths[index].unsqueeze(1) + torch.arange(longest, device=device).unsqueeze(0)
        logits = model(
            input_ids=ids,
            attention_mask=torch.cat([prompt_mask[index], mask], dim=1),
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
        ).logits
        token_lp = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
        for k, (b, t) in enumerate(chunk):
            total = float(first_lp[b, t[0]].double())
            if len(t) > 1:
                target = torch.tensor(t[1:], device=device)
                total += float(token_lp[k, : len(t) - 1].gather(-1, target.unsqueeze(-1)).double().sum())
            flat.append(total / len(t))
    scores: list[list[float]] = []
    it = iter(flat)
    for _, _, targets in batch:
        scores.append([next(it) for _ in targets])
    return scores


@torch.no_grad()
def pairwise_choice_scores(
    model: nn.Module, tokenizer: Any, rows: list[dict[str, Any]], *, batch_size: int, max_length: int
) -> list[list[float]]:
    """Length-normalised log-likelihood of every choice of every row, one sequence per pair."""
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
        logits = model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)).logits
        for (i, _, _), s in zip(batch, sequence_mean_logprob(logits, enc["labels"].to(device)).tolist()):
            scores[i].append(s)
    return scores


def count_choice_correct(scores: list[list[float]], rows: list[dict[str, Any]]) -> int:
    correct = 0
    for s, row in zip(scores, rows, strict=True):
        best = max(range(len(s)), key=lambda k: (s[k], -k))  # ties -> first choice
        correct += row["choices"][best] == row["output"]
    return correct
