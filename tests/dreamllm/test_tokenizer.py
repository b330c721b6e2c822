from dreamllm.tokenizer import special_ids


def test_local_tokenizer_has_vicunas_api_and_the_added_tokens(tok, cfg):
    ids = special_ids(tok, cfg.tokenizer)
    enc = tok("A red circle on a blue background.")
    assert enc.input_ids[0] == tok.bos_token_id == ids.bos  # BOS added, as Llama's tokenizer does
    assert tok.decode(enc.input_ids, skip_special_tokens=True).strip() == "A red circle on a blue background."
    # any text encodes (byte-level), nothing maps to <unk>
    assert tok.unk_token_id not in tok("naïve 日本 ✓", add_special_tokens=False).input_ids
    # the added tokens are single tokens at the end of the vocabulary
    assert ids.base_vocab_size == cfg.tokenizer.vocab_size
    for t in cfg.tokenizer.added_tokens:
        assert len(tok(t, add_special_tokens=False).input_ids) == 1
        assert tok.convert_tokens_to_ids(t) >= ids.base_vocab_size
