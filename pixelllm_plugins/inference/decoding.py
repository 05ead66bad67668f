"""Greedy and beam-search decoding over the ``LanguageModel`` KV-cache API (spec 3.7).

Only ``start_decoding`` / ``decode_step`` / ``reorder_state`` are used, so every language model (built-in
GIT decoder, Hugging Face causal or seq2seq) decodes through the same code. All M rows decode in one
batch; a row that is done is dropped from the batch (``reorder_state`` with the surviving rows), so
finished rows cost nothing.

- Greedy: argmax per step; the row's score is its mean token log-prob (EOS included).
- Beam search (T5X-style): per row, ``num_beams`` alive beams; each step ranks the ``2 * num_beams``
  best continuations; those ending in EOS enter the row's finished set with score
  ``log p / ((5 + len) / 6) ** length_penalty``; the best non-EOS ones stay alive. A row stops when its
  best alive beam, even at the maximum length's (largest) brevity penalty, cannot beat its worst finished
  beam. The reported score is the chosen sequence's mean token log-prob, as for greedy.
- ``num_beams == 1`` is greedy decoding (as in Hugging Face and T5X decoding configs).

Tokens are returned per row as ``[BOS, ..., EOS]``; a row that hit ``max_new_tokens`` without EOS ends
without it (``finished[i]`` is False then). ``min_new_tokens`` forbids EOS before that many tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import InvalidPromptError
from ..modeling.language import LanguageModel

NEG_INF = float("-inf")


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # per row: BOS .. EOS inclusive
    scores: list[float]  # per row: mean log-prob of the generated tokens (EOS included)
    finished: list[bool] = field(default_factory=list)  # per row: ended with EOS


def brevity_penalty(length: int | Tensor, alpha: float) -> float | Tensor:
    """T5X brevity penalty ``((5 + length) / 6) ** alpha``."""
    return ((5.0 + length) / 6.0) ** alpha


def _check(visual: Tensor, context_ids: Tensor, context_mask: Tensor, max_new_tokens: int, num_beams: int):
    if visual.ndim != 3 or context_ids.ndim != 2 or context_mask.shape != context_ids.shape:
        raise InvalidPromptError(
            f"generate expects visual [M,Q,D], context_ids [M,Tc] and a context_mask of the same shape; got "
            f"{tuple(visual.shape)}, {tuple(context_ids.shape)}, {tuple(context_mask.shape)}"
        )
    if visual.shape[0] != context_ids.shape[0]:
        raise InvalidPromptError(f"visual has {visual.shape[0]} rows but context_ids has {context_ids.shape[0]}")
    if max_new_tokens < 0 or num_beams < 1:
        raise InvalidPromptError(f"max_new_tokens must be >= 0 and num_beams >= 1 (got {max_new_tokens}, "
                                 f"{num_beams})")


@torch.no_grad()
def generate(lm: LanguageModel, visual: Tensor, context_ids: Tensor, context_mask: Tensor, *, bos_id: int,
             eos_id: int, pad_id: int, max_new_tokens: int, num_beams: int = 1, length_penalty: float = 0.6,
             min_new_tokens: int = 1, word_bias: Tensor | None = None) -> GenerationResult:
    """Decode one text per row. visual [M,Q,Dv], context_ids/context_mask [M,Tc]; ``word_bias`` [M,V'] is
    added to each row's next-word log-probabilities at every step to choose the words (``with_word_bias``);
    a text's score stays the language model's own mean log-probability of it."""
    _check(visual, context_ids, context_mask, max_new_tokens, num_beams)
    m = visual.shape[0]
    if m == 0:
        return GenerationResult([], [], [])
    if max_new_tokens == 0:
        return GenerationResult([[bos_id] for _ in range(m)], [0.0] * m, [False] * m)
    if num_beams == 1:
        return greedy_search(lm, visual, context_ids, context_mask, bos_id=bos_id, eos_id=eos_id,
                             pad_id=pad_id, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                             word_bias=word_bias)
    return beam_search(lm, visual, context_ids, context_mask, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
                       max_new_tokens=max_new_tokens, num_beams=num_beams, length_penalty=length_penalty,
                       min_new_tokens=min_new_tokens, word_bias=word_bias)


def with_word_bias(scores: Tensor, word_bias: Tensor | None, eos_id: int) -> Tensor:
    """scores [..., V] (next-word logits or log-probabilities) plus ``word_bias`` [..., V'] (V' <= V: the
    columns past V', an adapter's new words, get none), except at ``eos_id``: a vote on the words never
    ends a text early or late."""
    if word_bias is None:
        return scores
    bias = word_bias.to(scores.dtype)
    if bias.shape[-1] < scores.shape[-1]:
        bias = torch.nn.functional.pad(bias, (0, scores.shape[-1] - bias.shape[-1]))
    bias = bias[..., : scores.shape[-1]].clone()
    bias[..., eos_id] = 0.0
    return scores + bias


def _log_probs(logits: Tensor, step: int, eos_id: int, min_new_tokens: int, word_bias: Tensor | None = None
               ) -> tuple[Tensor, Tensor]:
    """(the scores that choose the next word: log-probabilities plus ``word_bias``, the language model's own
    log-probabilities, which a text's reported score averages)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if step < min_new_tokens:
        logp[..., eos_id] = NEG_INF
    return with_word_bias(logp, word_bias, eos_id), logp


@torch.no_grad()
def greedy_search(lm: LanguageModel, visual: Tensor, context_ids: Tensor, context_mask: Tensor, *, bos_id: int,
                  eos_id: int, pad_id: int, max_new_tokens: int, min_new_tokens: int = 1,
                  word_bias: Tensor | None = None) -> GenerationResult:
    m = visual.shape[0]
    device = visual.device
    state = lm.start_decoding(visual, context_ids, context_mask)
    out = torch.full((m, max_new_tokens), pad_id, dtype=torch.long, device=device)
    lengths = torch.zeros(m, dtype=torch.long, device=device)
    sum_logp = torch.zeros(m, dtype=torch.float32, device=device)
    finished = torch.zeros(m, dtype=torch.bool, device=device)
    alive = torch.arange(m, device=device)  # original row of each batch row still decoding
    tok = torch.full((m,), bos_id, dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        logits, _, state = lm.decode_step(state, tok)
        voted, logp = _log_probs(logits, step, eos_id, min_new_tokens,
                                 None if word_bias is None else word_bias[alive])
        tok = voted.argmax(dim=-1)
        out[alive, step] = tok
        sum_logp[alive] += logp.gather(1, tok[:, None])[:, 0]
        lengths[alive] += 1
        done = tok == eos_id
        if bool(done.any()):
            finished[alive[done]] = True
            keep = (~done).nonzero(as_tuple=True)[0]
            if keep.numel() == 0:
                break
            alive, tok = alive[keep], tok[keep]
            if step + 1 < max_new_tokens:
                state = lm.reorder_state(state, keep)
    tokens = [[bos_id] + out[i, : lengths[i]].tolist() for i in range(m)]
    scores = (sum_logp / lengths.clamp(min=1)).tolist()
    return GenerationResult(tokens, scores, finished.tolist())


@torch.no_grad()
def beam_search(lm: LanguageModel, visual: Tensor, context_ids: Tensor, context_mask: Tensor, *, bos_id: int,
                eos_id: int, pad_id: int, max_new_tokens: int, num_beams: int, length_penalty: float = 0.6,
                min_new_tokens: int = 1, word_bias: Tensor | None = None) -> GenerationResult:
    m, k = visual.shape[0], num_beams
    device = visual.device
    length_max = max_new_tokens
    state = lm.start_decoding(visual, context_ids, context_mask)
    state = lm.reorder_state(state, torch.arange(m, device=device).repeat_interleave(k))
    rows = torch.arange(m, device=device)  # original row of each active row
    # alive beams: sequences of generated tokens, summed log-probs (only beam 0 live at the start)
    alive_seq = torch.full((m, k, max_new_tokens), pad_id, dtype=torch.long, device=device)
    alive_logp = torch.full((m, k), NEG_INF, device=device)
    alive_logp[:, 0] = 0.0
    alive_own = torch.zeros((m, k), device=device)  # the language model's own summed log-probabilities
    # finished beams: normalised score, sequence, summed log-prob (the language model's own), length
    fin_score = torch.full((m, k), NEG_INF, device=device)
    fin_seq = torch.full((m, k, max_new_tokens), pad_id, dtype=torch.long, device=device)
    fin_logp = torch.zeros((m, k), device=device)
    fin_len = torch.ones((m, k), dtype=torch.long, device=device)
    results: dict[int, tuple[list[int], float, bool]] = {}
    tok = torch.full((m * k,), bos_id, dtype=torch.long, device=device)
    max_bp = brevity_penalty(length_max, length_penalty)

    for step in range(max_new_tokens):
        a = rows.shape[0]
        logits, _, state = lm.decode_step(state, tok)
        bias = None if word_bias is None else word_bias[rows].repeat_interleave(k, dim=0)
        voted, own = _log_probs(logits, step, eos_id, min_new_tokens, bias)
        logp = voted.view(a, k, -1)
        vocab = logp.shape[-1]
        cand = (alive_logp[:, :, None] + logp).view(a, k * vocab)
        n_cand = min(2 * k, k * vocab)
        cand_logp, cand_idx = cand.topk(n_cand, dim=-1)
        # the language model's own summed log-probability of each candidate (what a result reports)
        cand_own = (cand_logp if word_bias is None
                    else (alive_own[:, :, None] + own.view(a, k, -1)).view(a, k * vocab).gather(1, cand_idx))
        cand_beam, cand_tok = cand_idx // vocab, cand_idx % vocab
        cand_seq = alive_seq.gather(1, cand_beam[:, :, None].expand(-1, -1, max_new_tokens)).clone()
        cand_seq[:, :, step] = cand_tok
        is_eos = cand_tok == eos_id
        length = step + 1
        # finished set: merge the EOS candidates, keep the k best by normalised score
        new_score = torch.where(is_eos, cand_logp / brevity_penalty(length, length_penalty),
                                torch.full_like(cand_logp, NEG_INF))
        all_score = torch.cat([fin_score, new_score], 1)
        fin_score, pick = all_score.topk(k, dim=-1)
        fin_seq = torch.cat([fin_seq, cand_seq], 1).gather(1, pick[:, :, None].expand(-1, -1, max_new_tokens))
        fin_logp = torch.cat([fin_logp, cand_own], 1).gather(1, pick)
        fin_len = torch.cat([fin_len, torch.full_like(cand_logp, length, dtype=torch.long)], 1).gather(1, pick)
        # alive set: the k best non-EOS candidates
        alive_cand = torch.where(is_eos, torch.full_like(cand_logp, NEG_INF), cand_logp)
        alive_logp, pick = alive_cand.topk(k, dim=-1)
        alive_own = cand_own.gather(1, pick)
        alive_beam = cand_beam.gather(1, pick)
        alive_seq = cand_seq.gather(1, pick[:, :, None].expand(-1, -1, max_new_tokens))
        tok_rows = cand_tok.gather(1, pick)
        # a row is done when no alive beam can beat its worst finished beam (or at the last step)
        worst_finished = fin_score[:, -1]
        best_alive_bound = alive_logp[:, 0] / max_bp
        done = (worst_finished > best_alive_bound) | torch.isinf(alive_logp[:, 0])
        if length == max_new_tokens:
            done = torch.ones_like(done)
        if bool(done.any()):
            for j in done.nonzero(as_tuple=True)[0].tolist():
                results[int(rows[j])] = _pick_result(j, fin_score, fin_seq, fin_logp, fin_len, alive_own,
                                                     alive_seq, length, length_penalty, bos_id)
            keep = (~done).nonzero(as_tuple=True)[0]
            if keep.numel() == 0:
                break
            rows = rows[keep]
            alive_seq, alive_logp, alive_own, alive_beam, tok_rows = (
                alive_seq[keep], alive_logp[keep], alive_own[keep], alive_beam[keep], tok_rows[keep])
            fin_score, fin_seq, fin_logp, fin_len = fin_score[keep], fin_seq[keep], fin_logp[keep], fin_len[keep]
        # cache rows follow their beams: new beam (r, i) continues old beam (r, alive_beam[r, i])
        a = rows.shape[0]
        prev_rows = keep if bool(done.any()) else torch.arange(a, device=device)
        flat = (prev_rows[:, None] * k + alive_beam).reshape(-1)
        state = lm.reorder_state(state, flat)
        tok = tok_rows.reshape(-1)

    tokens, scores, finished = [], [], []
    for i in range(m):
        seq, score, fin = results[i]
        tokens.append(seq)
        scores.append(score)
        finished.append(fin)
    return GenerationResult(tokens, scores, finished)


def _pick_result(j: int, fin_score: Tensor, fin_seq: Tensor, fin_logp: Tensor, fin_len: Tensor,
                 alive_logp: Tensor, alive_seq: Tensor, length: int, alpha: float,
                 bos_id: int) -> tuple[list[int], float, bool]:
    """Best finished beam of active row j; the best alive beam when none finished. The score: the mean of
    ``fin_logp`` / ``alive_logp`` (the language model's own log-probabilities) over the text."""
    if torch.isfinite(fin_score[j, 0]):
        n = int(fin_len[j, 0])
        return [bos_id] + fin_seq[j, 0, :n].tolist(), float(fin_logp[j, 0]) / n, True
    return [bos_id] + alive_seq[j, 0, :length].tolist(), float(alive_logp[j, 0]) / length, False
