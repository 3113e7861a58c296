"""Multiple-choice tasks: pick the choice with the highest length-normalised log-likelihood.

Score of a choice = mean log-probability of its answer tokens (the choice text followed by eos,
exactly what training puts the loss on) given the prompt.

`choice_scores` (the evaluation's scorer) runs each row's prompt once (left-padded batch of rows
sorted by prompt length, KV cache kept) and scores all of its choices from that cache: the
prompt's last logits give each choice's first token, and one more forward per batch gives the
rest, with every row's choices packed in one sequence after its prompt (a 4D mask lets a choice
token see the prompt and the earlier tokens of its own choice only; positions restart at the
prompt's end for each choice). Tokens processed per row drop from n_choices * (prompt + choice) to
prompt + n_choices * choice, with no copy of the cache. `pairwise_choice_scores` is the plain form
(one right-padded forward per (row, choice) pair): the reference the cached form is tested and
benchmarked against (benchmarks/mc_scoring.py), and the path for rows whose prompt + longest
choice exceed max_length (fit_pair cuts those prompts per choice) and for attention kernels that
take no custom 4D mask (flash attention).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from pm_ray.data.prompts import format_prompt
from pm_ray.data.tokenize import IGNORE_INDEX, answer_ids, collate_pairs, fit_pair, pad_token_id
from pm_ray.eval.prefix import PromptPrefix
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
    model: nn.Module,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    *,
    batch_size: int,
    max_length: int,
    share_prefix: bool = True,
) -> list[list[float]]:
    """Length-normalised log-likelihood of every choice of every row (prompt run once per row;
    with ``share_prefix`` the prefix all prompts share runs once, eval/prefix.py)."""
    scores: list[list[float]] = [[] for _ in rows]
    cached: list[tuple[int, list[int], list[list[int]]]] = []
    fallback: list[int] = []
    packed = packed_mask_supported(model)
    for i, row in enumerate(rows):
        prompt = list(tokenizer(format_prompt(tokenizer, row), add_special_tokens=False)["input_ids"])
        targets = [answer_ids(tokenizer, choice) for choice in row["choices"]]
        if packed and len(prompt) + max(len(t) for t in targets) <= max_length:
            cached.append((i, prompt, targets))
        else:  # fit_pair would cut this prompt per choice: score those pairs one by one
            fallback.append(i)
    cached.sort(key=lambda item: len(item[1]))  # similar prompt lengths per batch: less left padding
    prefix = PromptPrefix([])
    if share_prefix and cached:
        prefix = PromptPrefix.build(model, [p for _, p, _ in cached], model_device(model))
    for batch in chunks(cached, batch_size):
        for (i, _, _), row_scores in zip(batch, _cached_batch_scores(model, tokenizer, batch, prefix)):
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


def packed_mask_supported(model: nn.Module) -> bool:
    """Whether the model's attention reads a custom 4D mask as given (sdpa, eager); flash-attention
    kernels take padding from a 2D mask only, so such models are scored pair by pair."""
    return getattr(getattr(model, "config", None), "_attn_implementation", "sdpa") in ("sdpa", "eager")


def _cached_batch_scores(
    model: nn.Module,
    tokenizer: Any,
    batch: list[tuple[int, list[int], list[list[int]]]],
    prefix: PromptPrefix,
) -> list[list[float]]:
    device = model_device(model)
    pad_id = pad_token_id(tokenizer)
    # [shared prefix (cached)] [left padding] [the row's own prompt tokens]; no prefix: plain left padding
    input_ids, full_mask, positions = prefix.pack([p for _, p, _ in batch], pad_id)
    prompt_mask = full_mask.bool()
    lengths = prompt_mask.sum(-1)
    out = model(
        input_ids=input_ids.to(device),
        attention_mask=full_mask.to(device),
        position_ids=positions.to(device),
        past_key_values=prefix.cache_for(len(batch)),
        use_cache=True,
        logits_to_keep=1,
    )  # only the last position: it predicts the first token of every choice
    first_lp = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)
    # All choices of a row packed in one sequence after the cached prompt: a choice's token sees
    # the prompt and the earlier tokens of its own choice only; positions restart at the prompt end.
    seq = max(sum(len(t) for t in targets) for _, _, targets in batch)
    ids = torch.full((len(batch), seq), pad_id, dtype=torch.long)
    pos = torch.zeros((len(batch), seq), dtype=torch.long)
    segment = torch.full((len(batch), seq), -1, dtype=torch.long)  # choice index, -1 = padding
    starts: list[list[int]] = []
    for b, (_, _, targets) in enumerate(batch):
        offset, row_starts = 0, []
        for c, t in enumerate(targets):
            ids[b, offset : offset + len(t)] = torch.tensor(t, dtype=torch.long)
            pos[b, offset : offset + len(t)] = lengths[b] + torch.arange(len(t))
            segment[b, offset : offset + len(t)] = c
            row_starts.append(offset)
            offset += len(t)
        starts.append(row_starts)
    order = torch.arange(seq)
    own = (segment[:, :, None] == segment[:, None, :]) & (order[None, :, None] >= order[None, None, :])
    own |= torch.eye(seq, dtype=torch.bool)[None]  # padding queries see themselves (no empty row)
    allowed = torch.cat([prompt_mask[:, None, :].expand(-1, seq, -1), own], dim=-1)[:, None]
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    logits = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),  # 4D additive mask: used as given (sdpa and eager)
        position_ids=pos.to(device),
        past_key_values=out.past_key_values,
        use_cache=True,
    ).logits
    scores: list[list[float]] = []
    for b, (_, _, targets) in enumerate(batch):
        token_lp = torch.log_softmax(logits[b].float(), dim=-1)
        row: list[float] = []
        for s, t in zip(starts[b], targets):
            if not t:
                row.append(0.0)  # as the pairwise path: no answer tokens scores 0
                continue
            total = float(first_lp[b, t[0]].double())
            if len(t) > 1:
                target = torch.tensor(t[1:], device=device)
                total += float(token_lp[s : s + len(t) - 1].gather(-1, target.unsqueeze(-1)).double().sum())
            row.append(total / len(t))
        scores.append(row)
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
