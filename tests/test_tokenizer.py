"""Tokenizers: the built-in byte tokenizer, and HF tokenizer.json files checked against
transformers.

The HF tokenizers here are trained in the test (a tiny byte-level BPE), so nothing is downloaded.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from fastattn.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

TEXTS = ["", "hello world", "héllo 🙂 日本", "tabs\tand\nnewlines\x00", "the quick brown fox"]


# ---------------------------------------------------------------------------------------------
# ByteTokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.encode(text, add_bos=True) == [257, *ids]
    assert tok.decode(tok.encode(text, add_bos=True) + [tok.eos_id]) == text


def test_byte_special_ids():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 256, 257, 258)
    assert tok.eos_ids == (258,)
    ids = [257, *b"hi", 258, 256, 256]
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special=False) == "<bos>hi<eos><pad><pad>"


def test_byte_decode_invalid_utf8_does_not_raise():
    tok = ByteTokenizer()
    smile = tok.encode("🙂")  # 4 bytes
    assert tok.decode([0xFF, 0xFE]) == "\ufffd\ufffd"
    assert tok.decode(smile[:2]) == "\ufffd"  # a cut-off character
    assert tok.decode([*b"a", *smile[1:], *b"b"]) == "a\ufffd\ufffd\ufffdb"  # no lead byte
    # A special token inside a character: rendered, it splits the character (each piece is
    # replaced); skipped, it is dropped as HFTokenizer drops it.
    inside = [*smile[:2], 258, *smile[2:]]
    assert tok.decode(inside, skip_special=False) == "\ufffd<eos>\ufffd\ufffd"
    assert tok.decode(inside) == "🙂"


def test_byte_decode_takes_numpy_ids():
    tok = ByteTokenizer()
    ids = np.asarray(tok.encode("héllo", add_bos=True), dtype=np.int32)
    assert tok.decode(ids) == "héllo"


@pytest.mark.parametrize("bad", [-1, 259, 10**9])
def test_byte_decode_out_of_range_raises(bad):
    with pytest.raises(ValueError, match=rf"token id {bad} is outside the vocabulary \[0, 259\)"):
        ByteTokenizer().decode([104, bad])


def test_byte_decode_rejects_float_ids():
    with pytest.raises(TypeError):
        ByteTokenizer().decode([104.0])


def test_byte_encode_batch():
    tok = ByteTokenizer()
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert tok.encode_batch(TEXTS, add_bos=True) == [tok.encode(t, add_bos=True) for t in TEXTS]


# ---------------------------------------------------------------------------------------------
# HFTokenizer


def _train_bpe() -> tokenizers.Tokenizer:
    """A byte-level BPE (the GPT-2 / Llama 3 kind) whose post-processor prepends <s> itself."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 3 + ["hello there, world", "brown foxes jump"], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


@pytest.fixture(scope="module")
def bpe() -> tokenizers.Tokenizer:
    return _train_bpe()


@pytest.fixture
def checkpoint(tmp_path, bpe):
    """A checkpoint: tokenizer.json + a tokenizer_config.json (eos as an AddedToken dict)."""
    bpe.save(str(tmp_path / "tokenizer.json"))
    _write_json(tmp_path / "tokenizer_config.json", {
        "bos_token": "<s>",
        "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True},
        "pad_token": None,
    })
    return tmp_path


def _write_json(path, data):
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("via", ["directory", "file"])
def test_hf_loads_checkpoint(checkpoint, bpe, via):
    tok = load_tokenizer(checkpoint if via == "directory" else str(checkpoint / "tokenizer.json"))
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == bpe.get_vocab_size() > 259  # 3 special + 256 bytes + merges
    assert tok.bos_id == bpe.token_to_id("<s>") == 1
    assert tok.eos_id == bpe.token_to_id("</s>") == 2
    assert tok.eos_ids == (2,)
    assert tok.pad_id is None  # "pad_token": null


@pytest.mark.parametrize("text", TEXTS)
def test_hf_round_trip_and_bos_once(checkpoint, text):
    tok = load_tokenizer(checkpoint)
    ids = tok.encode(text)
    assert tok.bos_id not in ids  # the post-processor's <s> is not applied
    assert tok.decode(ids) == text
    with_bos = tok.encode(text, add_bos=True)
    assert with_bos == [tok.bos_id, *ids]
    assert tok.decode([*with_bos, tok.eos_id]) == text
    assert tok.decode([*with_bos, tok.eos_id], skip_special=False) == f"<s>{text}</s>"


def test_hf_encode_batch(checkpoint):
    tok = load_tokenizer(checkpoint)
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert tok.encode_batch(iter(TEXTS), add_bos=True) == [tok.encode(t, add_bos=True)
                                                           for t in TEXTS]


def test_hf_agrees_with_transformers(tmp_path, bpe):
    """A directory as transformers' save_pretrained writes it; ids and special tokens agree."""
    from transformers import PreTrainedTokenizerFast

    bpe.save(str(tmp_path / "bpe.json"))
    reference = PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "bpe.json"), bos_token="<s>", eos_token="</s>",
        pad_token="<pad>")
    reference.save_pretrained(tmp_path / "checkpoint")
    tok = load_tokenizer(tmp_path / "checkpoint")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (
        reference.bos_token_id, reference.eos_token_id, reference.pad_token_id)
    for text in [*TEXTS, "unseen wörds: ∑ x² <s> inside"]:
        assert tok.encode(text) == reference.encode(text, add_special_tokens=False), text
        # The checkpoint's own template prepends <s>; add_bos=True gives the same ids.
        assert tok.encode(text, add_bos=True) == reference.encode(text), text
        ids = reference.encode(text)
        assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True), text


def test_hf_special_tokens_fallbacks(tmp_path, bpe):
    """special_tokens_map.json and config.json name what tokenizer_config.json leaves out."""
    bpe.save(str(tmp_path / "tokenizer.json"))
    _write_json(tmp_path / "tokenizer_config.json", {"eos_token": "</s>"})
    _write_json(tmp_path / "special_tokens_map.json", {"bos_token": {"content": "<s>"},
                                                       "eos_token": "<pad>"})
    # Llama 3 Instruct style: several ids end a generation.
    _write_json(tmp_path / "config.json", {"eos_token_id": [7, 2], "pad_token_id": 0})
    tok = load_tokenizer(tmp_path)
    assert tok.bos_id == 1  # special_tokens_map.json
    assert tok.eos_id == 2  # tokenizer_config.json wins over the other two
    assert tok.eos_ids == (2, 0, 7)  # every eos any file names, by priority, once each
    assert tok.pad_id == 0  # config.json
    assert tok.decode([1, *tok.encode("fox"), 7, 0]) == "fox"


def test_hf_tokenizer_json_alone_has_no_special_tokens(tmp_path, bpe):
    bpe.save(str(tmp_path / "tokenizer.json"))
    tok = HFTokenizer(tmp_path / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eos_ids) == (None, None, None, ())
    assert tok.decode(tok.encode("fox")) == "fox"
    with pytest.raises(ValueError, match="no bos token"):
        tok.encode("fox", add_bos=True)


def test_hf_vocab_size_bounds_ids_with_holes(tmp_path):
    """Ids need not be dense: vocab_size is the largest id + 1, not the number of tokens."""
    word_level = tokenizers.Tokenizer(models.WordLevel({"a": 0, "b": 5, "[UNK]": 6}, "[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert tok.vocab_size == 7
    assert tok.encode("a b c") == [0, 5, 6]
    with pytest.raises(ValueError, match=r"token id 7 is outside the vocabulary \[0, 7\)"):
        tok.decode([0, 7])


def test_hf_decode_out_of_range_raises(checkpoint):
    tok = load_tokenizer(checkpoint)
    for bad in (-1, tok.vocab_size):
        with pytest.raises(ValueError, match=rf"token id {bad} is outside the vocabulary"):
            tok.decode([1, bad])


# ---------------------------------------------------------------------------------------------
# load_tokenizer and bad inputs


def test_load_byte():
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


@pytest.mark.parametrize(
    "spec", ["gpt2", "meta-llama/Llama-3.1-8B", "bytes", "no/such/tokenizer.json"])
def test_load_unknown_spec_raises(spec):
    with pytest.raises(ValueError, match=rf"{re.escape(repr(spec))}.*'byte'.*tokenizer\.json"):
        load_tokenizer(spec)


def test_load_wrong_type_raises():
    with pytest.raises(TypeError, match="load_tokenizer got 123; expected None or 'byte'"):
        load_tokenizer(123)


def test_directory_without_tokenizer_json_raises(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"")  # a sentencepiece-only checkpoint
    expected = r"no tokenizer file at .*tokenizer\.json'.*save_pretrained"
    with pytest.raises(FileNotFoundError, match=expected):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing.json"))):
        HFTokenizer(tmp_path / "missing.json")


def test_malformed_files_raise(tmp_path, bpe):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a valid tokenizer.json"):
        load_tokenizer(tmp_path)
    bpe.save(str(tmp_path / "tokenizer.json"))
    _write_json(tmp_path / "tokenizer_config.json", {"bos_token": "<|begin_of_text|>"})
    with pytest.raises(ValueError, match=r"bos_token='<\|begin_of_text\|>' in .*tokenizer_config"):
        load_tokenizer(tmp_path)
    _write_json(tmp_path / "tokenizer_config.json", {})
    _write_json(tmp_path / "config.json", {"eos_token_id": "2"})
    with pytest.raises(ValueError, match=r"eos_token_id='2' in .*config\.json.*an int or a list"):
        load_tokenizer(tmp_path)


def test_import_does_not_need_tokenizers():
    """fastattn.tokenizer imports `tokenizers` only when an HFTokenizer is built."""
    code = "import sys, fastattn.tokenizer; assert 'tokenizers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)
