from pixelllm_plugins.tokenizer import PixelTokenizer


def test_default_is_deterministic_and_round_trips(tmp_path):
    a, b = PixelTokenizer.default(), PixelTokenizer.default()
    text = "where is the large red circle left of the blue star"
    assert a.encode(text) == b.encode(text)
    a.save(tmp_path)
    c = PixelTokenizer.load(tmp_path)
    assert c.encode(text) == a.encode(text) and c.vocab_size == a.vocab_size
    assert c.decode(c.encode(text, add_bos=True)) == text


def test_unseen_word_is_spelled_not_unknown():
    tok = PixelTokenizer.default()
    ids = tok.encode("pentagon zebra42", add_eos=False)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == "pentagon zebra42"


def test_words_group_pieces():
    tok = PixelTokenizer.default()
    ids = tok.encode("a pentagon", add_bos=True)
    words = tok.words(ids)
    assert [w for w, _ in words] == ["a", "pentagon"]
    assert words[1][1] == list(range(2, len(ids) - 1))  # every piece of 'pentagon', no BOS/EOS


def test_truncation_keeps_bos_and_eos():
    tok = PixelTokenizer.default()
    ids = tok.encode("red " * 50, max_len=8, add_bos=True)
    assert len(ids) == 8 and ids[0] == tok.bos_id and ids[-1] == tok.eos_id
