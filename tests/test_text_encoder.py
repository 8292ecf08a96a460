"""Frozen text encoder: tiny random T5 saved and loaded like a real one, fixed length, mask, empty caption."""

import json

import pytest
import torch

from cogvx_ds.models.text_encoder import DEFAULT_MAX_LENGTH, TextEncoder, build_tiny_t5

CAPTIONS = ["a red circle moving left on a black background", "a blue square", ""]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_tiny_t5(tmp_path_factory.mktemp("t5"), d_model=32, seed=0)


@pytest.fixture(scope="module")
def encoder(tiny_path):
    return TextEncoder.from_pretrained(tiny_path)


def test_round_trip_loads_the_saved_weights(tiny_path, encoder):
    from transformers import T5EncoderModel

    config = json.loads((tiny_path / "config.json").read_text())
    assert config["d_model"] == 32 and config["architectures"] == ["T5EncoderModel"]
    reference = T5EncoderModel.from_pretrained(tiny_path)
    for (name, p), (_, q) in zip(reference.state_dict().items(), encoder.model.state_dict().items()):
        assert torch.equal(p, q), name
    assert encoder.hidden_size == 32
    assert not any(p.requires_grad for p in encoder.model.parameters())


def test_fixed_length_padding_and_mask(encoder):
    emb, mask = encoder.encode(CAPTIONS)
    assert emb.shape == (3, DEFAULT_MAX_LENGTH, 32) and emb.dtype == torch.float32
    assert mask.shape == (3, DEFAULT_MAX_LENGTH) and mask.dtype == torch.int64
    # Byte tokens: one per UTF-8 byte plus the end-of-sequence token, the rest is padding.
    assert mask.sum(1).tolist() == [len(c.encode()) + 1 for c in CAPTIONS]
    ids, _ = encoder.tokenize(CAPTIONS)
    assert bool((ids[mask == 0] == encoder.tokenizer.pad_token_id).all())
    # Too long: truncated to the fixed length, still ending in EOS.
    long_ids, long_mask = encoder.tokenize(["x" * 1000])
    assert long_ids.shape == (1, DEFAULT_MAX_LENGTH) and bool(long_mask.all())
    assert long_ids[0, -1].item() == encoder.tokenizer.eos_token_id
    assert torch.isfinite(emb).all()


def test_batching_and_reloading_are_deterministic(tiny_path, encoder, tmp_path):
    emb, _ = encoder.encode(CAPTIONS)
    emb_small_batches, _ = encoder.encode(CAPTIONS, batch_size=1)
    torch.testing.assert_close(emb, emb_small_batches, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(TextEncoder.from_pretrained(tiny_path).encode(CAPTIONS)[0], emb, rtol=0, atol=0)
    # Same seed -> identical model; another seed -> another one.
    same = TextEncoder.from_pretrained(build_tiny_t5(tmp_path / "same", d_model=32, seed=0))
    other = TextEncoder.from_pretrained(build_tiny_t5(tmp_path / "other", d_model=32, seed=1))
    assert torch.equal(same.encode(CAPTIONS)[0], emb)
    assert not torch.allclose(other.encode(CAPTIONS)[0], emb)


def test_build_tiny_t5_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    build_tiny_t5(tmp_path, d_model=16, num_heads=2, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_empty_caption_is_cached_and_used_for_dropout(encoder):
    empty, empty_mask = encoder.empty_embedding()
    assert empty.shape == (1, DEFAULT_MAX_LENGTH, 32) and empty_mask.sum().item() == 1  # just EOS
    assert encoder.empty_embedding()[0] is empty  # cached
    torch.testing.assert_close(encoder.encode([""])[0], empty)
    emb, mask = encoder.encode(CAPTIONS[:2])
    dropped, dropped_mask = encoder.drop_captions(emb, mask, torch.tensor([True, False]))
    assert torch.equal(dropped[0], empty[0]) and torch.equal(dropped[1], emb[1])
    assert torch.equal(dropped_mask[0], empty_mask[0]) and torch.equal(dropped_mask[1], mask[1])


def test_attention_mask_option_changes_only_what_it_should(tiny_path):
    masked = TextEncoder.from_pretrained(tiny_path, max_length=64, use_attention_mask=True)
    unmasked = TextEncoder.from_pretrained(tiny_path, max_length=64)
    a, mask = masked.encode(CAPTIONS[:1])
    b, _ = unmasked.encode(CAPTIONS[:1])
    assert a.shape == (1, 64, 32)
    assert not torch.allclose(a, b)  # CogVideoX's default: pad tokens are attended (parity with released weights)
    # With the mask, real tokens do not depend on how much padding follows.
    c, _ = TextEncoder.from_pretrained(tiny_path, max_length=100, use_attention_mask=True).encode(CAPTIONS[:1])
    n = int(mask.sum())
    torch.testing.assert_close(a[0, :n], c[0, :n], rtol=1e-5, atol=1e-5)


def test_pipeline_folder_layout(tiny_path, tmp_path):
    from transformers import AutoTokenizer, T5EncoderModel

    T5EncoderModel.from_pretrained(tiny_path).save_pretrained(tmp_path / "text_encoder")
    AutoTokenizer.from_pretrained(tiny_path).save_pretrained(tmp_path / "tokenizer")
    enc = TextEncoder.from_pretrained(tmp_path)
    torch.testing.assert_close(enc.encode(CAPTIONS)[0], TextEncoder.from_pretrained(tiny_path).encode(CAPTIONS)[0])


def test_clear_errors(tmp_path, tiny_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextEncoder.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        TextEncoder.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((tiny_path / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="weights"):
        TextEncoder.from_pretrained(tmp_path)
    encoder = TextEncoder.from_pretrained(tiny_path)
    with pytest.raises(TypeError, match="list of strings"):
        encoder.encode("a single string")
    with pytest.raises(ValueError, match="captions is empty"):
        encoder.encode([])
    encoder.tokenizer.pad_token = None  # a tokenizer without a padding token fails at once, not at the first prompt
    assert encoder.tokenizer.pad_token_id is None
    with pytest.raises(ValueError, match="has no padding token"):
        TextEncoder(encoder.model, encoder.tokenizer)


def test_dtype_and_move_reset_the_empty_cache(tiny_path):
    enc = TextEncoder.from_pretrained(tiny_path, max_length=16, dtype=torch.bfloat16)
    assert enc.encode(["a"])[0].dtype == torch.bfloat16 and enc.empty_embedding()[0].dtype == torch.bfloat16
    enc.to(dtype=torch.float32)
    assert enc.empty_embedding()[0].dtype == torch.float32  # recomputed, not the stale bf16 one


def test_word_level_tiny_t5_one_token_per_word(tmp_path):
    """build_tiny_t5(vocabulary=...): every word of the captions is one token (lower-cased, punctuation split
    off), unknown words map to <unk>, </s> ends every caption; the saved folder reloads with AutoTokenizer."""
    from transformers import AutoTokenizer

    path = build_tiny_t5(tmp_path / "w", d_model=32, vocabulary=["a red circle", "A blue square, moving left"])
    tok = AutoTokenizer.from_pretrained(path)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("a Blue circle, moving up").input_ids
    assert ids == [3, 6, 5, 8, 9, 2, 1]  # a blue circle , moving <unk> </s>
    encoder = TextEncoder.from_pretrained(path, max_length=8)
    emb, mask = encoder.encode(["a red circle", "a blue circle"])
    assert emb.shape == (2, 8, 32) and mask.sum(1).tolist() == [4, 4]
    assert not torch.allclose(emb[0, 1], emb[1, 1])  # red vs blue
    assert encoder.model.config.vocab_size == len(tok) == 11  # 3 specials + 8 words and ","
    with pytest.raises(ValueError, match="no words"):
        build_tiny_t5(tmp_path / "empty", vocabulary=[" "])
