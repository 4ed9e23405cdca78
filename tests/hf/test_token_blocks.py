"""``fedfleet tokenize`` and ``TokenBlocks``: a corpus made where the text is, read offline on a node."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedfleet.cli.main import main
from fedfleet.errors import DataError
from fedfleet.hf.data import TokenBlocks, gpt2_tokenizer, tokenize_corpus
from fedfleet.hf.data.token_blocks import MANIFEST

DOCS = [f"Party {i} writes a short document number {i} about federated learning." for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


def sources(tmp_path):
    """The same 40 documents as .txt (first 10), .jsonl (next 20) and .csv (last 10)."""
    txt, jsonl, csv = tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path / "c.csv"
    txt.write_text("\n".join(DOCS[:10]) + "\n\n", encoding="utf-8")
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS[10:30])))
    csv.write_text("id,text\n" + "".join(f'{i},"{d}"\n' for i, d in enumerate(DOCS[30:])), encoding="utf-8")
    return [txt, jsonl, csv]


def test_blocks_are_the_documents_ids_joined_by_eos_and_cut_to_seq_len(tmp_path, tokenizer):
    out = tmp_path / "corpus"
    summary = tokenize_corpus(sources(tmp_path), tokenizer, out, seq_len=16, shard_bytes=16 * 2 * 7)
    expected = [i for d in DOCS for i in [*tokenizer(d, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]]
    blocks = TokenBlocks(out, tokenizer)
    assert len(blocks) == len(expected) // 16 == summary.blocks
    assert summary.dropped_tokens == len(expected) % 16 and summary.documents == 40
    got = np.concatenate([blocks[i]["input_ids"].numpy() for i in range(len(blocks))])
    assert got.tolist() == expected[: len(blocks) * 16]
    assert summary.shards == -(-summary.blocks // 7) > 1  # 7 blocks of 16 uint16 ids per shard
    assert blocks[-1]["labels"].tolist() == blocks[-1]["input_ids"].tolist()
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["dtype"] == "uint16" and [s["name"] for s in manifest["sources"]] == ["a.txt", "b.jsonl", "c.csv"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("tokens-"))[0] == (
        f"tokens-00001-of-{summary.shards:05d}.safetensors"
    )
    assert not list(tmp_path.glob(".corpus.partial-*"))  # published by rename


def test_a_changed_shard_a_missing_one_and_another_vocabulary_are_refused(tmp_path, tokenizer):
    out = tmp_path / "corpus"
    tokenize_corpus(sources(tmp_path), tokenizer, out, seq_len=16, shard_bytes=16 * 2 * 7)
    shard = sorted(out.glob("tokens-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{shard.name}: its SHA-256 is not the manifest's"):
        TokenBlocks(out)
    shard.unlink()
    with pytest.raises(DataError, match=rf"{shard.name}: a shard the manifest lists is missing"):
        TokenBlocks(out)
    other = tmp_path / "other"
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(DOCS, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"]))
    own = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="[EOS]")
    tokenize_corpus(sources(tmp_path), own, other, seq_len=4)
    with pytest.raises(DataError, match="made by another tokenizer"):
        TokenBlocks(other, tokenizer)
    assert len(TokenBlocks(other, own)) > 0


def test_existing_folders_are_replaced_only_when_they_are_corpora_and_overwrite_is_given(tmp_path, tokenizer):
    files = sources(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    with pytest.raises(DataError, match="is not a tokenised corpus"):
        tokenize_corpus(files, tokenizer, mine, seq_len=8)
    assert (mine / "notes.txt").read_text() == "the user's"
    out = tmp_path / "corpus"
    tokenize_corpus(files, tokenizer, out, seq_len=8)
    with pytest.raises(DataError, match="pass --overwrite"):
        tokenize_corpus(files, tokenizer, out, seq_len=8)
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(DataError, match=r"files tokenize did not write \(notes.txt\)"):
        tokenize_corpus(files, tokenizer, out, seq_len=8, overwrite=True)
    (out / "notes.txt").unlink()
    assert tokenize_corpus(files, tokenizer, out, seq_len=32, overwrite=True).blocks == len(TokenBlocks(out))


@pytest.mark.parametrize(
    ("name", "body", "message"),
    [
        ("x.jsonl", '{"body": "no text"}\n', r"x.jsonl:1: no string field 'text'"),
        ("x.jsonl", "not json\n", r"x.jsonl:1: not a JSON line"),
        ("x.csv", "body\nhello\n", r"x.csv: no column 'text'; its columns: body"),
        ("x.md", "# title\n", r"x.md: unknown kind of text file"),
        ("x.txt", "hi\n", r"fewer than one block of seq_len 512"),
    ],
)
def test_bad_sources_name_the_file(tmp_path, tokenizer, name, body, message):
    (tmp_path / name).write_text(body)
    with pytest.raises(DataError, match=message):
        tokenize_corpus([tmp_path / name], tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_the_command_line_writes_a_corpus_with_its_tokenizer_that_loads_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = [str(p) for p in sources(tmp_path)]
    out = tmp_path / "corpus"
    assert main(["tokenize", *files, "--tokenizer", "gpt2", "--out", str(out), "--seq-len", "8", "--quiet"]) == 0
    assert "tokenised 40 documents" in capsys.readouterr().out
    saved = tmp_path / "saved"  # the saved tokenizer is itself a --tokenizer folder
    assert main(["tokenize", *files, "--tokenizer", str(out / "tokenizer"), "--out", str(saved), "--quiet"]) == 0
    first = TokenBlocks(saved, gpt2_tokenizer())[0]["input_ids"]  # 512 ids; the same text, the same ids
    assert first[:8].tolist() == TokenBlocks(out)[0]["input_ids"].tolist()
    assert main(["tokenize", files[0], "--tokenizer", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "not a folder" in capsys.readouterr().err
