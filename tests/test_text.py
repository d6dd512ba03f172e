import pytest

from polymodal.errors import InputError
from polymodal.modalities.text import (
    BOS,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    TOKENIZER_FILE,
    TextTokenizer,
    validate_text,
)

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star", "cross")
CAPTIONS = [
    f"A {size} {colour} {shape} in the {place}"
    for size, colour, shape, place in zip(
        ["small", "large", "big", "tiny"] * 9,
        COLOURS * 6,
        SHAPES * 8,
        ["top left", "centre", "bottom right", "middle"] * 9,
        strict=False,
    )
]


@pytest.fixture(scope="module")
def tokenizer():
    assert len(CAPTIONS) >= 30
    return TextTokenizer.train(CAPTIONS, vocab_size=300)


def test_special_tokens_present_and_pad_is_zero(tokenizer):
    vocab = tokenizer.tokenizer.get_vocab()
    for token in SPECIAL_TOKENS:
        assert token in vocab
    assert tokenizer.pad_id == 0 == tokenizer.tokenizer.token_to_id(PAD)
    ids = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.boi_id, tokenizer.eoi_id}
    assert len(ids) == 5
    assert tokenizer.vocab_size <= 300


def test_encode_adds_bos_and_eos(tokenizer):
    ids = tokenizer.encode("a red circle")
    assert ids[0] == tokenizer.bos_id == tokenizer.tokenizer.token_to_id(BOS)
    assert ids[-1] == tokenizer.eos_id == tokenizer.tokenizer.token_to_id(EOS)
    plain = tokenizer.encode("a red circle", add_special_tokens=False)
    assert ids[1:-1] == plain
    assert tokenizer.bos_id not in plain and tokenizer.eos_id not in plain


@pytest.mark.parametrize("text", ["A Red Circle in the CENTRE", "a purple star, top left!", "Zebra 42"])
def test_decode_inverts_encode_lowercased(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text.lower()


def test_save_and_load_give_identical_ids(tokenizer, tmp_path):
    path = tokenizer.save_pretrained(tmp_path / "tok")
    assert path == tmp_path / "tok" / TOKENIZER_FILE and path.is_file()
    for where in (tmp_path / "tok", path):
        loaded = TextTokenizer.from_pretrained(where)
        assert loaded.vocab_size == tokenizer.vocab_size
        assert (loaded.pad_id, loaded.bos_id, loaded.eos_id) == (
            tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)
        for text in CAPTIONS[:10] + ["Something Unseen, qwerty!"]:
            assert loaded.encode(text) == tokenizer.encode(text)


def test_batch_pads_and_masks(tokenizer):
    texts = ["a red circle", "a large green triangle in the bottom right corner", "star"]
    ids, mask = tokenizer.batch(texts)
    rows = [tokenizer.encode(t) for t in texts]
    longest = max(len(r) for r in rows)
    assert ids.shape == mask.shape == (3, longest)
    assert mask.dtype.is_floating_point is False
    for i, row in enumerate(rows):
        assert ids[i, : len(row)].tolist() == row
        assert (ids[i, len(row):] == tokenizer.pad_id).all()
        assert mask[i].sum().item() == len(row)
        assert mask[i, : len(row)].all() and not mask[i, len(row):].any()


def test_max_length_truncation_keeps_eos_last(tokenizer):
    long_text = " ".join(CAPTIONS[:5])
    full = tokenizer.encode(long_text)
    assert len(full) > 8
    ids, mask = tokenizer.batch([long_text, "star"], max_length=8)
    assert ids.shape == (2, 8)
    assert ids[0].tolist() == full[:7] + [tokenizer.eos_id]
    assert mask[0].all()
    short = tokenizer.encode("star")
    assert ids[1, len(short) - 1].item() == tokenizer.eos_id
    assert mask[1].sum().item() == len(short)


def test_validate_text_strips_good_text():
    assert validate_text("  a red circle \n") == "a red circle"


@pytest.mark.parametrize(
    ("value", "problem"),
    [("", "empty"), ("   \n\t ", "empty"), (None, "NoneType"), (42, "int"), ("x" * 101, "limit")],
)
def test_validate_text_rejects_bad_text_naming_the_source(value, problem):
    with pytest.raises(InputError) as info:
        validate_text(value, source="captions.jsonl line 3", max_chars=100)
    assert info.value.source == "captions.jsonl line 3"
    assert "captions.jsonl line 3" in str(info.value)
    assert problem in str(info.value)


def test_from_pretrained_missing_folder_names_the_path(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(InputError) as info:
        TextTokenizer.from_pretrained(missing)
    assert str(missing) in str(info.value)
    assert "not found" in info.value.problem


def test_from_pretrained_empty_folder_names_the_path(tmp_path):
    with pytest.raises(InputError) as info:
        TextTokenizer.from_pretrained(tmp_path)
    assert str(tmp_path / TOKENIZER_FILE) in str(info.value)


@pytest.mark.parametrize("content", ["this is not json {", '{"version": "1.0"}', ""])
def test_from_pretrained_garbage_file_names_the_path(tmp_path, content):
    (tmp_path / TOKENIZER_FILE).write_text(content)
    with pytest.raises(InputError) as info:
        TextTokenizer.from_pretrained(tmp_path)
    assert str(tmp_path / TOKENIZER_FILE) in str(info.value)
    assert "cannot read tokenizer" in info.value.problem
