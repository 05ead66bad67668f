"""HFCausalLM (tiny GPT-2) and HFSeq2SeqLM (tiny T5): shapes, KV cache vs forward, LoRA, freezing."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer

from pixelllm_plugins.config import LanguageConfig
from pixelllm_plugins.errors import CheckpointError
from pixelllm_plugins.inference.decoding import generate
from pixelllm_plugins.modeling.build import build_language_model
from pixelllm_plugins.modeling.language_hf import BASE_LM_ADAPTER, HFCausalLM, HFSeq2SeqLM

from .conftest import PAD, VOCAB

KINDS = ["hf-causal", "hf-seq2seq"]
DV = 24  # visual token width


def make_lm(lm_paths, kind, **kw):
    torch.manual_seed(0)
    cfg = LanguageConfig(kind=kind, hf_name_or_path=lm_paths[kind], **kw)
    return build_language_model(cfg, visual_dim=DV, vocab_size=VOCAB)


def randomise_lora(lm):
    """peft zero-initialises B; make the adapters matter so the cache path is really tested with them."""
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if ".lora_" in n:
                p.normal_(0, 0.3)


def batch(m=3, q=4, tc=5, t=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    visual = torch.randn(m, q, DV, generator=g)
    ctx = torch.randint(2, VOCAB, (m, tc), generator=g)
    cmask = torch.ones(m, tc, dtype=torch.bool)
    cmask[0, 2:] = False  # rows padded differently
    cmask[1, 4:] = False
    ctx[~cmask] = PAD
    text = torch.randint(2, VOCAB, (m, t), generator=g)
    text[:, 0] = PAD  # BOS
    return visual, ctx, cmask, text, torch.ones(m, t, dtype=torch.bool)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_shapes_and_cache_match(lm_paths, kind):
    lm = make_lm(lm_paths, kind, lora_r=4, freeze=True).eval()
    assert isinstance(lm, HFCausalLM if kind == "hf-causal" else HFSeq2SeqLM)
    assert lm.hidden_size == 32 and lm.vocab_size == VOCAB
    randomise_lora(lm)
    visual, ctx, cmask, text, tmask = batch()
    with torch.no_grad():
        logits, hidden = lm(visual, ctx, cmask, text, tmask)
        assert logits.shape == (3, 6, VOCAB) and hidden.shape == (3, 6, 32)
        state = lm.start_decoding(visual, ctx, cmask)
        steps = []
        for i in range(text.shape[1]):
            lg, hd, state = lm.decode_step(state, text[:, i])
            steps.append((lg, hd))
    torch.testing.assert_close(torch.stack([s[0] for s in steps], 1), logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.stack([s[1] for s in steps], 1), hidden, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_padding_does_not_change_a_row(lm_paths, kind):
    lm = make_lm(lm_paths, kind).eval()
    visual, ctx, cmask, text, tmask = batch()
    with torch.no_grad():
        full, _ = lm(visual, ctx, cmask, text, tmask)
        n = int(cmask[0].sum())
        alone, _ = lm(visual[:1], ctx[:1, :n], cmask[:1, :n], text[:1], tmask[:1])
    torch.testing.assert_close(alone[0], full[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_reorder_state(lm_paths, kind):
    lm = make_lm(lm_paths, kind, lora_r=2).eval()
    randomise_lora(lm)
    visual, ctx, cmask, text, tmask = batch()
    index = torch.tensor([2, 0, 0])  # reorder, duplicate and drop rows mid-way
    with torch.no_grad():
        expected, _ = lm(visual[index], ctx[index], cmask[index], text[index], tmask[index])
        state = lm.start_decoding(visual, ctx, cmask)
        state = lm.reorder_state(state, torch.tensor([0, 1, 2, 2]))  # expansion before any step
        _, _, state = lm.decode_step(state, text[[0, 1, 2, 2], 0])
        _, _, state = lm.decode_step(state, text[[0, 1, 2, 2], 1])
        state = lm.reorder_state(state, torch.tensor([3, 0, 0]))
        lg, _, state = lm.decode_step(state, text[index, 2])
    torch.testing.assert_close(lg, expected[:, 2], atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_lora_trains_only_adapters(lm_paths, kind):
    lm = make_lm(lm_paths, kind, lora_r=4, freeze=True)
    layers = [m for m in lm.modules() if isinstance(m, LoraLayer)]
    assert layers, "no LoRA layers injected"
    assert all(m.scaling[BASE_LM_ADAPTER] == pytest.approx(2.0) for m in layers)  # alpha = 2r: scale 2
    assert all(m.r[BASE_LM_ADAPTER] == 4 for m in layers)
    expected_targets = {"hf-causal": ["c_attn"], "hf-seq2seq": ["q", "v"]}[kind]
    assert lm.lora_targets == expected_targets
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("visual_") for n in trainable)
    assert any(n.startswith("visual_proj") for n in trainable) and any(n.startswith("visual_norm") for n in trainable)
    frozen = {n: p.detach().clone() for n, p in lm.named_parameters() if not p.requires_grad}

    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    visual, ctx, cmask, text, tmask = batch()
    logits, hidden = lm(visual, ctx, cmask, text, tmask)
    (logits.logsumexp(-1).mean() + hidden.pow(2).mean()).backward()
    opt.step()
    for n, p in lm.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lm.named_parameters() if "lora_B" in n)

    custom = make_lm(lm_paths, kind, lora_r=4, lora_alpha=4, freeze=True)
    assert {m.scaling[BASE_LM_ADAPTER] for m in custom.modules() if isinstance(m, LoraLayer)} == {1.0}


@pytest.mark.parametrize("kind", KINDS)
def test_freeze_without_lora(lm_paths, kind):
    frozen = make_lm(lm_paths, kind, freeze=True)
    assert {n.split(".")[0] for n, p in frozen.named_parameters() if p.requires_grad} == {"visual_proj",
                                                                                          "visual_norm"}
    full = make_lm(lm_paths, kind)
    assert all(p.requires_grad for p in full.parameters())


def test_lora_target_override_and_errors(lm_paths):
    lm = make_lm(lm_paths, "hf-seq2seq", lora_r=2, lora_target_modules=["q", "k", "v", "o"])
    names = {n.rsplit(".", 4)[-4] for n, _ in lm.named_parameters() if ".lora_A." in n}
    assert names == {"q", "k", "v", "o"}
    with pytest.raises(CheckpointError, match="lora_target_modules"):
        make_lm(lm_paths, "hf-seq2seq", lora_r=2, lora_target_modules=["nope"])
    with pytest.raises(CheckpointError, match="hf_name_or_path"):
        HFCausalLM(LanguageConfig(kind="hf-causal"), visual_dim=DV)
    with pytest.raises(CheckpointError, match="seq2seq"):
        HFCausalLM(LanguageConfig(kind="hf-causal", hf_name_or_path=lm_paths["hf-seq2seq"]), visual_dim=DV)


def _uncached_greedy(lm, visual, ctx, cmask, eos, max_new, min_new):
    """Reference: argmax over full teacher-forced forwards, one row at a time, no cache."""
    rows = []
    for i in range(visual.shape[0]):
        seq = [PAD]
        for step in range(max_new):
            t = torch.tensor([seq])
            logits, _ = lm(visual[i:i + 1], ctx[i:i + 1], cmask[i:i + 1], t, torch.ones_like(t, dtype=torch.bool))
            lp = logits[0, -1].float().log_softmax(-1)
            if step < min_new:
                lp[eos] = float("-inf")
            seq.append(int(lp.argmax()))
            if seq[-1] == eos:
                break
        rows.append(seq)
    return rows


@pytest.mark.parametrize("kind", KINDS)
def test_generate_with_cache_matches_uncached(lm_paths, kind):
    lm = make_lm(lm_paths, kind, lora_r=2).eval()
    randomise_lora(lm)
    visual, ctx, cmask, _, _ = batch(m=4)
    with torch.no_grad():
        # a pure argmax probe (eos -1 never matches), then call the token row 0 produced at step 1 "EOS" so
        # rows end at different steps (exercises dropping finished rows from the cache)
        probe = generate(lm, visual, ctx, cmask, bos_id=PAD, eos_id=-1, pad_id=PAD, max_new_tokens=6,
                         min_new_tokens=0)
        assert all(len(t) == 7 for t in probe.tokens) and not any(probe.finished)
        eos = probe.tokens[0][2]
        res = generate(lm, visual, ctx, cmask, bos_id=PAD, eos_id=eos, pad_id=PAD, max_new_tokens=6,
                       min_new_tokens=0)
        assert res.tokens == _uncached_greedy(lm, visual, ctx, cmask, eos, 6, 0)
        assert res.finished[0] and len(res.tokens[0]) <= 3

        beams = generate(lm, visual, ctx, cmask, bos_id=PAD, eos_id=eos, pad_id=PAD, max_new_tokens=5,
                         num_beams=3)
        # every reported score is the sequence's true mean log-prob (checks the cache reordering)
        for i, seq in enumerate(beams.tokens):
            t = torch.tensor([seq])
            logits, _ = lm(visual[i:i + 1], ctx[i:i + 1], cmask[i:i + 1], t, torch.ones_like(t, dtype=torch.bool))
            lp = logits[0, :-1].float().log_softmax(-1).gather(1, t[0, 1:, None]).squeeze(1)
            assert beams.scores[i] == pytest.approx(float(lp.mean()), abs=1e-4)
