"""Parties whose token ids mean different tokens are refused, even when their embedding tables have one shape."""

import csv
import threading

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast, TrainingArguments

from fedfleet.errors import ConfigError
from fedfleet.hf import FedArguments, FedAvgClient, LocalFederation
from fedfleet.hf.data import TokenizerDataset, gpt2_tokenizer, read_reviews, vocab_fingerprint

VOCAB = 200  # both parties' vocabularies have this many words: the tables match in shape, not in meaning


def own_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A word-level vocabulary built from the party's own texts (what a newcomer might do)."""
    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=["[PAD]", "[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")


def client(ctx, texts, labels, tokenizer, folder):
    path = folder / "train.csv"
    folder.mkdir(parents=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *zip(texts, labels, strict=True)])
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=32,
            n_layer=1,
            n_embd=16,
            n_head=2,
            pad_token_id=0,
            bos_token_id=None,
            eos_token_id=None,
        )
    )
    args = TrainingArguments(
        output_dir=str(folder), max_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    train = TokenizerDataset(tokenizer, max_length=16, padding="max_length").load(path)
    return FedAvgClient(ctx, model, FedArguments("step", 1), args, train_set=train, tokenizer=tokenizer)


def test_parties_with_their_own_vocabularies_of_one_size_are_refused(tmp_path):
    texts, labels = read_reviews()
    texts, labels = [str(t) for t in texts[:80]], [int(v) for v in labels[:80]]
    mine, theirs = own_tokenizer(texts[:40]), own_tokenizer(texts[40:])
    assert len(mine) == len(theirs) and mine.get_vocab() != theirs.get_vocab()
    fed = LocalFederation(2, timeout=60)
    clients = [
        client(fed.context(0), texts[:40], labels[:40], mine, tmp_path / "a"),
        client(fed.context(1), texts[40:], labels[40:], theirs, tmp_path / "b"),
    ]
    errors: dict[int, BaseException | None] = {}

    def train(i):
        try:
            clients[i].train()
            errors[i] = None
        except BaseException as exc:
            errors[i] = exc

    threads = [threading.Thread(target=train, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert isinstance(errors[1], ConfigError), errors
    assert "party-1's tokenizer gives token ids other meanings than party-0's" in str(errors[1])
    assert errors[0] is not None  # and party-0 is told instead of waiting for a party that cannot join


def test_the_fingerprint_is_the_id_table_not_the_tokenizer_object():
    gpt2 = gpt2_tokenizer()
    assert vocab_fingerprint(gpt2) == vocab_fingerprint(gpt2_tokenizer())  # rebuilt: the same ids
    grown = gpt2_tokenizer()
    grown.add_special_tokens({"additional_special_tokens": ["<sep>"]})  # one more id: another vocabulary
    assert vocab_fingerprint(grown) != vocab_fingerprint(gpt2)
