"""Greedy and beam search over the KV-cache API, on a toy bigram LanguageModel."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pixelllm_plugins.errors import InvalidPromptError
from pixelllm_plugins.inference.decoding import brevity_penalty, generate, greedy_search
from pixelllm_plugins.modeling.language import LanguageModel

BOS, EOS, PAD = 0, 1, 2


class ToyLM(LanguageModel):
    """Next-token logits = table[previous token] + a per-row bias read from the visual tokens.

    The state is (bias rows, number of steps): it supports reordering, duplicating and dropping rows.
    """

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table)
        self.vocab_size = table.shape[0]
        self.hidden_size = table.shape[0]
        self.calls = []  # batch size of every decode_step

    def start_decoding(self, visual, context_ids, context_mask):
        return {"bias": visual[:, 0, : self.vocab_size].clone()}

    def decode_step(self, state, token_ids):
        self.calls.append(int(token_ids.shape[0]))
        logits = self.table[token_ids] + state["bias"]
        return logits, logits, state

    def reorder_state(self, state, index):
        return {"bias": state["bias"].index_select(0, index)}


def logp_table(rows: dict[int, dict[int, float]], vocab: int) -> torch.Tensor:
    """Log-prob table from {prev: {next: prob}}; unspecified mass spread over the remaining tokens."""
    t = torch.full((vocab, vocab), 1e-9)
    for prev, probs in rows.items():
        for nxt, p in probs.items():
            t[prev, nxt] = p
    return t.log()


def seq_logprob(lm: ToyLM, bias: torch.Tensor, seq: list[int]) -> float:
    total = 0.0
    for a, b in itertools.pairwise(seq):
        total += float((lm.table[a] + bias).log_softmax(-1)[b])
    return total


def random_case(m=5, vocab=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lm = ToyLM(torch.randn(vocab, vocab, generator=g) * 2)
    visual = torch.randn(m, 2, vocab, generator=g)
    ctx = torch.zeros(m, 3, dtype=torch.long)
    return lm, visual, ctx, torch.ones(m, 3, dtype=torch.bool)


def greedy_by_hand(lm, visual, max_new, min_new):
    out = []
    for i in range(visual.shape[0]):
        bias = visual[i, 0, : lm.vocab_size]
        seq, logps = [BOS], []
        for step in range(max_new):
            lp = (lm.table[seq[-1]] + bias).log_softmax(-1)
            if step < min_new:
                lp[EOS] = -math.inf
            nxt = int(lp.argmax())
            seq.append(nxt)
            logps.append(float(lp[nxt]))
            if nxt == EOS:
                break
        out.append((seq, sum(logps) / len(logps)))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_equals_argmax_by_hand(seed):
    lm, visual, ctx, cmask = random_case(seed=seed)
    res = generate(lm, visual, ctx, cmask, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_new_tokens=8)
    expected = greedy_by_hand(lm, visual, 8, 1)
    assert res.tokens == [e[0] for e in expected]
    assert res.scores == pytest.approx([e[1] for e in expected], abs=1e-5)
    assert res.finished == [t[-1] == EOS for t in res.tokens]


def test_rows_finish_independently_and_leave_the_batch():
    # token 3 -> EOS surely; 4 -> 4 forever; row bias picks the first token
    table = logp_table({BOS: {3: 0.5, 4: 0.5}, 3: {EOS: 0.99}, 4: {4: 0.99}}, vocab=5)
    lm = ToyLM(table)
    visual = torch.zeros(3, 1, 5)
    visual[0, 0, 3] = visual[2, 0, 3] = 5.0  # rows 0 and 2 start with 3 (then EOS), row 1 with 4
    visual[1, 0, 4] = 5.0
    ctx, cmask = torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1, dtype=torch.bool)
    res = generate(lm, visual, ctx, cmask, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_new_tokens=5)
    assert res.tokens == [[BOS, 3, EOS], [BOS, 4, 4, 4, 4, 4], [BOS, 3, EOS]]
    assert res.finished == [True, False, True]
    assert lm.calls == [3, 3, 1, 1, 1]  # finished rows cost nothing


def test_min_new_tokens_forbids_early_eos():
    table = logp_table({BOS: {EOS: 0.9, 3: 0.1}, 3: {EOS: 0.9}}, vocab=4)
    lm = ToyLM(table)
    visual, ctx, cmask = torch.zeros(1, 1, 4), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool)
    assert generate(lm, visual, ctx, cmask, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_new_tokens=4,
                    min_new_tokens=0).tokens == [[BOS, EOS]]
    assert generate(lm, visual, ctx, cmask, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_new_tokens=4).tokens == [
        [BOS, 3, EOS]]


@pytest.mark.parametrize("seed", [0, 3])
def test_one_beam_is_greedy(seed):
    lm, visual, ctx, cmask = random_case(seed=seed)
    greedy = greedy_search(lm, visual, ctx, cmask, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_new_tokens=6)
    beam = generate(lm, visual, ctx, cmask, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_new_tokens=6, num_beams=1)
    assert beam == greedy


def test_beam_beats_greedy_on_a_garden_path():
    # greedy takes 3 (p=0.6) and then faces 8 equally likely tokens; 4 (p=0.4) leads straight to EOS
    spread = {t: 0.12 for t in range(5, 13)}
    table = logp_table({BOS: {3: 0.6, 4: 0.4}, 3: spread, 4: {EOS: 0.99}, **{t: {EOS: 0.99} for t in spread}},
                       vocab=13)
    lm = ToyLM(table)
    visual, ctx, cmask = torch.zeros(1, 1, 13), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool)
    kw = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD, max_new_tokens=6)
    greedy = generate(lm, visual, ctx, cmask, **kw)
    beam = generate(lm, visual, ctx, cmask, num_beams=3, **kw)
    assert greedy.tokens[0][:2] == [BOS, 3]
    assert beam.tokens == [[BOS, 4, EOS]] and beam.finished == [True]
    bias = visual[0, 0]
    assert seq_logprob(lm, bias, beam.tokens[0]) > seq_logprob(lm, bias, greedy.tokens[0])
    assert beam.scores[0] > greedy.scores[0]
    assert beam.scores[0] == pytest.approx(seq_logprob(lm, bias, beam.tokens[0]) / 2, abs=1e-5)


def brute_force_best(lm, bias, max_new, alpha, vocab):
    """Best finished sequence by the T5X normalised score, over every sequence (EOS never before step 1)."""
    best, best_seq = -math.inf, None
    for n in range(1, max_new + 1):
        for body in itertools.product([t for t in range(vocab) if t != EOS], repeat=n - 1):
            seq = [BOS, *body, EOS]
            score = seq_logprob(lm, bias, seq) / brevity_penalty(n, alpha)
            if n == 1:  # min_new_tokens=1 forbids an immediate EOS
                continue
            if score > best:
                best, best_seq = score, seq
    return best_seq


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.5])
def test_wide_beam_finds_the_best_sequence(alpha):
    lm, visual, ctx, cmask = random_case(m=4, vocab=4, seed=5)
    res = generate(lm, visual, ctx, cmask, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_new_tokens=4, num_beams=27,
                   length_penalty=alpha)
    for i in range(4):
        assert res.tokens[i] == brute_force_best(lm, visual[i, 0, :4], 4, alpha, 4)


def test_beam_rows_are_independent():
    lm, visual, ctx, cmask = random_case(m=6, vocab=9, seed=7)
    kw = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD, max_new_tokens=7, num_beams=3)
    together = generate(lm, visual, ctx, cmask, **kw)
    for i in range(6):
        alone = generate(lm, visual[i:i + 1], ctx[i:i + 1], cmask[i:i + 1], **kw)
        assert alone.tokens[0] == together.tokens[i]
        assert alone.scores[0] == pytest.approx(together.scores[i], abs=1e-6)
        assert together.tokens[i][0] == BOS


def test_edge_cases():
    lm, visual, ctx, cmask = random_case(m=2)
    res = generate(lm, visual, ctx, cmask, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_new_tokens=0)
    assert res.tokens == [[BOS], [BOS]]
    empty = generate(lm, visual[:0], ctx[:0], cmask[:0], bos_id=BOS, eos_id=EOS, pad_id=PAD, max_new_tokens=3)
    assert empty.tokens == [] and empty.scores == []
    with pytest.raises(InvalidPromptError):
        generate(lm, visual, ctx[:1], cmask[:1], bos_id=BOS, eos_id=EOS, pad_id=PAD, max_new_tokens=3)
    with pytest.raises(InvalidPromptError):
        generate(lm, visual, ctx, cmask, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_new_tokens=3, num_beams=0)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_word_bias_reorders_words_per_row_and_never_touches_the_end(num_beams):
    # BOS -> 3 (p 0.6) or 4 (p 0.4), then EOS; a vote against 3 turns row 1 to 4, row 0 keeps 3
    table = logp_table({BOS: {3: 0.6, 4: 0.4}, 3: {EOS: 0.99}, 4: {EOS: 0.99}}, vocab=5)
    lm = ToyLM(table)
    visual, ctx, cmask = torch.zeros(2, 1, 5), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.bool)
    kw = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD, max_new_tokens=4, num_beams=num_beams)
    assert generate(lm, visual, ctx, cmask, **kw).tokens == [[BOS, 3, EOS]] * 2
    bias = torch.zeros(2, 4)  # narrower than the vocabulary: token 4 (an adapter's new word) gets no vote
    bias[1, 3] = -2.0
    bias[0, 3] = -0.1  # not enough to turn row 0
    bias[:, EOS] = -50.0  # a vote on the end of the text is ignored
    res = generate(lm, visual, ctx, cmask, word_bias=bias, **kw)
    assert res.tokens == [[BOS, 3, EOS], [BOS, 4, EOS]]
    # the scores stay the language model's own mean log-probabilities (then EOS, p about 1)
    assert res.scores == pytest.approx([math.log(0.6) / 2, math.log(0.4) / 2], abs=1e-3)
