"""The offline GPT-2 tokenizer and the text-to-shard scripts."""

import numpy as np
import pytest

from data.build_shakespeare import markdown_to_text
from data.loader import TokenLoader, ValidationData, find_shards
from data.shards import EOT_TOKEN, ShardError, load_tokens
from data.tokenize_text import main as tokenize_main
from data.tokenize_text import split_documents
from data.tokenizer import BYTES_EOT, TOKENIZERS, encode_bytes, gpt2_encoding
from tests.conftest import REPO


def test_gpt2_ids_from_the_shipped_ranks():
    encoding, source = gpt2_encoding()
    assert "gpt2.tiktoken (sha256 verified)" in source
    # Ids of GPT-2 itself, independent of this repository.
    assert encoding.encode_ordinary("Hello world") == [15496, 995]
    assert encoding.n_vocab == 50257
    assert encoding.decode([15496, 995, EOT_TOKEN]) == "Hello world<|endoftext|>"


def test_a_corrupt_ranks_file_is_refused(tmp_path):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_text("aGVsbG8= 0\n")
    with pytest.raises(ValueError, match="has sha256"):
        gpt2_encoding(bad)
    with pytest.raises(FileNotFoundError):
        gpt2_encoding(tmp_path / "missing.tiktoken")


def test_split_keeps_documents_whole():
    docs = [np.full(n, i, dtype=np.uint16) for i, n in enumerate([50, 30, 10, 10])]
    train, val = split_documents(docs, 0.15)
    assert val.tolist() == [2] * 10 + [3] * 10  # whole last documents until >= 15%
    assert len(train) == 80
    with pytest.raises(ValueError, match="at least 2 documents"):
        split_documents(docs[:1], 0.1)


def test_tokenize_text_writes_shards_with_eot_before_each_document(tmp_path):
    texts = ["First document. " * 20, "Second one, longer. " * 40, "Third. " * 5]
    files = []
    for i, text in enumerate(texts):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(text)
    out = tmp_path / "out"
    tokenize_main(
        [
            *map(str, files),
            "--out_dir",
            str(out),
            "--name",
            "mine",
            "--val_fraction",
            "0.02",
            "--shard_tokens",
            "100",
        ]
    )
    encoding, _ = gpt2_encoding()
    train = np.concatenate([load_tokens(p) for p in find_shards(out, "train")])
    val = load_tokens(find_shards(out, "val")[0])
    assert len(find_shards(out, "train")) > 1  # 100-token shards
    assert val[0] == EOT_TOKEN and encoding.decode(val[1:].tolist()) == texts[2]
    docs = encoding.decode(train.tolist()).split("<|endoftext|>")
    assert docs == ["", texts[0], texts[1]]


def test_markdown_to_text():
    md = "# Hamlet\n\n## ACT I\n\n_Enter BERNARDO_\n\n**BERNARDO**  \nWho's there?  \n\\--Stand!\n"
    assert markdown_to_text(md) == "Hamlet\n\nACT I\n\nEnter BERNARDO\n\nBERNARDO\nWho's there?\n--Stand!\n"


def test_embedded_data_is_valid():
    from tests.conftest import SHAKESPEARE

    train = find_shards(SHAKESPEARE, "train")
    val = find_shards(SHAKESPEARE, "val")
    tokens = load_tokens(train[0])
    assert len(tokens) > 1_000_000 and len(load_tokens(val[0])) > 50_000
    assert tokens[0] == EOT_TOKEN and tokens.max() < EOT_TOKEN + 1


def test_bytes_round_trip_and_separate_documents():
    ids = encode_bytes("Æ and I")
    assert ids[0] == BYTES_EOT and max(ids) < TOKENIZERS["bytes"].vocab_size == 256
    assert TOKENIZERS["bytes"].decode(ids + encode_bytes("two")) == "Æ and Itwo"
    assert TOKENIZERS["gpt2"].decode([15496, 995]) == "Hello world"


def test_encode_reads_text_as_the_ids_decode_reads_back():
    assert TOKENIZERS["gpt2"].encode("Hello world") == [15496, 995]
    assert TOKENIZERS["bytes"].encode("Æ I") == [195, 134, 32, 73]
    # An end-of-text marker in the text is text, not the separator.
    for tokenizer in TOKENIZERS.values():
        text = "a <|endoftext|> b"
        assert tokenizer.eot not in tokenizer.encode(text)
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_the_shipped_byte_data_is_the_shakespeare_plays_as_bytes(tmp_path, monkeypatch):
    import data.build_shakespeare_bytes as build

    monkeypatch.setattr(build, "OUT_DIR", tmp_path)
    build.main()
    for split in ("train", "val"):
        (shipped,) = find_shards(REPO / "data" / "shakespeare_bytes", split)
        (rebuilt,) = find_shards(tmp_path, split)
        assert shipped.read_bytes() == rebuilt.read_bytes()
    val = np.asarray(load_tokens(rebuilt))
    assert TOKENIZERS["bytes"].decode(val[:40].tolist()).startswith("Romeo and Juliet")


def test_shards_of_another_tokenizer_are_refused_before_training(tmp_path):
    with pytest.raises(ShardError, match="holds token id 50256, outside the tokenizer's 256 ids"):
        TokenLoader(find_shards(REPO / "data" / "shakespeare", "train"), 1, 8, vocab_size=256)
    with pytest.raises(ShardError, match="outside the tokenizer's 256 ids"):
        ValidationData(find_shards(REPO / "data" / "shakespeare", "val"), 8, 1, 8, vocab_size=256)
