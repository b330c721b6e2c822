import pytest
import torch

from dreamllm.sequence import (IGNORE, Image, Text, Turn, collate, document_from_mmc4, pack, turns_from_llava)


def test_images_follow_their_matched_sentence_as_dream_slot_then_input_block(builder):
    doc = {"text_list": ["First sentence.", "Second sentence.", "Third."],
           "image_info": [{"image_name": "img2.jpg", "matched_text_index": 1, "matched_sim": 0.3},
                          {"image_name": "img0.jpg", "matched_text_index": 0, "matched_sim": 0.4}]}
    items = document_from_mmc4(doc)
    assert items == [Text("First sentence."), Image("img0.jpg"), Text("Second sentence."), Image("img2.jpg"),
                     Text("Third.")]
    ex = builder.document(items)
    s = builder.ids
    ids = ex.input_ids
    assert ex.dream_keys == ex.image_keys == ["img0.jpg", "img2.jpg"]
    starts = [i for i, t in enumerate(ids) if t == s.dream_start]
    assert len(starts) == 2
    for st in starts:
        slot = ids[st:st + len(builder.dream_slot_ids())]
        assert slot == builder.dream_slot_ids()
        block_at = st + len(slot)
        assert ids[block_at:block_at + len(builder.image_block_ids())] == builder.image_block_ids()
    assert ids[0] == s.bos and ids[-1] == s.eos


def test_labels_learn_text_and_dream_start_but_not_slots_or_image_tokens(builder):
    ex = builder.document([Text("A red circle."), Image("a"), Text("More text.")])
    s = builder.ids
    for t, lab in zip(ex.input_ids, ex.labels):
        if t in (s.im_patch, s.im_start, s.im_end, s.dream_end, s.bos):
            assert lab == IGNORE
        else:  # text, <dream_start> and </s> are learned
            assert lab == t


def test_truncation_cuts_at_whole_chunks(builder):
    max_len = builder.max_len
    img_cost = len(builder.dream_slot_ids()) + len(builder.image_block_ids())
    # enough images to overflow: the cut happens between chunks, never inside an image
    items = [x for i in range(max_len // img_cost + 2) for x in (Text(f"Scene {i}."), Image(f"k{i}"))]
    ex = builder.document(items)
    assert ex.truncated and len(ex) <= max_len
    assert len(ex.dream_keys) == len(ex.image_keys) == ex.input_ids.count(builder.ids.dream_start)
    assert ex.input_ids.count(builder.ids.im_start) == ex.input_ids.count(builder.ids.im_end)
    assert builder.ids.eos not in ex.input_ids  # a cut document does not end
    # one long first sentence is cut at the token level instead of vanishing
    long_doc = builder.document([Text("word " * (2 * max_len))])
    assert len(long_doc) == max_len and long_doc.truncated


def test_pairs(builder):
    s = builder.ids
    comp = builder.pair("a green star", "k", "comprehension")
    assert comp.input_ids[1:1 + len(builder.image_block_ids())] == builder.image_block_ids()
    assert comp.image_keys == ["k"] and comp.dream_keys == []
    assert comp.labels[-1] == s.eos and all(label == IGNORE for label in comp.labels[:2 + builder.num_patches])
    crea = builder.pair("a green star", "k", "creation")
    assert crea.dream_keys == ["k"] and crea.image_keys == []
    assert crea.input_ids[-len(builder.dream_slot_ids()):] == builder.dream_slot_ids()
    assert crea.labels[crea.input_ids.index(s.dream_start)] == s.dream_start
    silent = builder.pair("a green star", "k", "creation", learn_text=False)  # stage I creation: no LM loss
    assert all(label == IGNORE for label in silent.labels)
    with pytest.raises(ValueError, match="task must be"):
        builder.pair("x", "k", "caption")


def test_conversation_learns_assistant_turns_only(builder, tok):
    turns = turns_from_llava([{"from": "human", "value": "<image>\nWhat color is the shape?"},
                              {"from": "gpt", "value": "red"},
                              {"from": "human", "value": "And the shape?"},
                              {"from": "gpt", "value": "circle"}], image_key="img")
    assert turns[0] == Turn("user", (Image("img"), Text("What color is the shape?")))
    ex = builder.conversation(turns)
    learned = [t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE]
    assert tok.decode(learned) == " red</s> circle</s>"
    assert ex.image_keys == ["img"] and ex.dream_keys == []
    # an image in an assistant turn is created: dream slot (with <dream_start> learned) then input block
    ex2 = builder.conversation([Turn("user", (Text("Draw a red circle."),)), Turn("assistant", (Image("out"),))])
    assert ex2.dream_keys == ["out"] == ex2.image_keys
    assert ex2.labels[ex2.input_ids.index(builder.ids.dream_start)] == builder.ids.dream_start
    with pytest.raises(ValueError, match="'from' must be one of"):
        turns_from_llava([{"from": "robot", "value": "hi"}], None)


def test_pack_first_fit_decreasing_respects_the_row_length():
    lengths = [90, 10, 50, 50, 30, 70, 20]
    bins = pack(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
    assert len(bins) == 4  # 320 tokens need at least 4 rows of 100
    with pytest.raises(ValueError, match="more than the row length"):
        pack([101], 100)


def test_collate_restarts_positions_per_example_and_orders_images(builder, images, tok):
    pixels, latents = images
    a = builder.document([Text("one"), Image("a")])
    b = builder.pair("two", "b", "comprehension")
    batch = collate([[a, b]], tok.pad_token_id, length=len(a) + len(b) + 3, pixels=pixels, latents=latents)
    pos = batch["position_ids"][0].tolist()
    assert pos[:len(a)] == list(range(len(a)))
    assert pos[len(a):len(a) + len(b)] == list(range(len(b)))
    assert pos[-3:] == [0, 1, 2]
    assert torch.equal(batch["pixel_values"], torch.stack([pixels["a"], pixels["b"]]))
    assert torch.equal(batch["latent_mean"], latents["a"][0][None])
    assert (batch["labels"][0, -3:] == IGNORE).all()


def test_the_chat_system_prompt_comes_from_the_model_config(tok, cfg):
    from dreamllm.config import VICUNA_SYSTEM_PROMPT, DreamLLMConfig, get_flavor
    from dreamllm.sequence import SequenceBuilder

    assert get_flavor("7b").system_prompt == VICUNA_SYSTEM_PROMPT
    turns = [Turn("user", (Text("Hi."),))]
    for prompt in ("A chat about pictures.", VICUNA_SYSTEM_PROMPT):
        b = SequenceBuilder(tok, DreamLLMConfig.from_dict({**cfg.to_dict(), "system_prompt": prompt}))
        ex = b.conversation(turns, add_generation_prompt=True)
        text = tok.decode(ex.input_ids[1:]).strip()
        assert text.startswith(prompt) and text.endswith("ASSISTANT:")
    # an explicit system line wins over the config's
    ex = SequenceBuilder(tok, cfg).conversation(turns, system="Be brief.")
    assert tok.decode(ex.input_ids[1:]).strip().startswith("Be brief.")
