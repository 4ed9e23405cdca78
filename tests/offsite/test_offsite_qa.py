"""FATE's QA task on an offline QA set: QaDataset + Seq2SeqCollator for a data owner, the hint when transformers'
DataCollatorForSeq2Seq (FATE's tutorial's) is given instead, and ``data: {source: mmlu}`` in a side's YAML."""

import threading

import pytest
import yaml
from transformers import DataCollatorForSeq2Seq

from fedfleet.cli.offsite import run_data_owner, run_owner
from fedfleet.config.offsite import parse_job
from fedfleet.errors import DataError
from fedfleet.hf import create_context
from fedfleet.hf.data import QaDataset, Seq2SeqCollator, gpt2_tokenizer, mmlu_questions
from fedfleet.offsite import AutoSubModel
from fedfleet.offsite.data import check_causal_batches
from fedfleet.offsite.session import OffsiteTuningClient
from tests.grpc_jobs import free_port
from tests.offsite_helpers import tiny_config
from tests.offsite_yaml import EXAMPLES

pytestmark = pytest.mark.usefixtures("one_thread")
HINT = r"Seq2SeqCollator\.for_tokenizer\(tokenizer\) \(from fedfleet\.hf\.data import Seq2SeqCollator\)"


def qa(tok):
    return QaDataset(tok, mmlu_questions(reasoning=False)[:8], max_length=64)


def test_hfs_seq2seq_collator_is_refused_with_the_fix_before_the_hand_out():
    tok = gpt2_tokenizer()
    data = qa(tok)
    hf = DataCollatorForSeq2Seq(tok)
    batch = hf([data[0], data[1]])
    assert batch["input_ids"].shape != batch["labels"].shape  # what the model's loss would fail on
    with pytest.raises(DataError, match=rf"DataCollatorForSeq2Seq gives input_ids of shape .*{HINT}"):
        check_causal_batches(hf, data)
    with pytest.raises(DataError, match=rf"no data_collator: .*{HINT}"):
        check_causal_batches(None, data)
    check_causal_batches(Seq2SeqCollator.for_tokenizer(tok), data)  # joined: the same shape

    parties = [("guest", "1"), ("arbiter", "2")]
    ctx = create_context(("guest", "1"), parties, "qa", f"127.0.0.1:{free_port()}", insecure=True)
    errors = []

    def build():
        try:
            OffsiteTuningClient(ctx, AutoSubModel(tiny_config(4), 2, 1, 1), train_set=data, data_collator=hf)
        except DataError as exc:
            errors.append(exc)

    thread = threading.Thread(target=build, daemon=True)
    thread.start()
    thread.join(30)  # no owner is listening: checked after the hand-out, it would wait
    assert not thread.is_alive() and "DataCollatorForSeq2Seq" in str(errors[0])


def side(name, **changes):
    raw = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    return parse_job({**raw, **changes})


def test_a_yaml_data_owner_tunes_on_mmlu_qa_and_reports_accuracy(tmp_path):
    address, handout = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    parties = [["guest", "9999"], ["arbiter", "10000"]]
    common = dict(parties=parties, address=address, handout_address=handout)
    owner = side("owner", **common, output=str(tmp_path / "owner"))
    guest = side(
        "guest",
        **common,
        output=str(tmp_path / "guest"),
        data={"source": "mmlu", "texts": 40, "held_out": 8, "block": 64, "shares": 1},
        training={"max_steps": 4, "batch_size": 4, "learning_rate": 1e-3},
        fed={"aggregate_strategy": "step", "aggregate_freq": 2},
    )
    summaries, errors = {}, []

    def run(name, fn, job):
        try:
            role, pid = (job.role, job.party_id)
            summaries[name] = fn(job, create_context((role, pid), job.parties, job.session, job.address, insecure=True))
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=a) for a in (("owner", run_owner, owner), ("guest", run_data_owner, guest))
    ]
    for t in threads:
        t.start()
    threads[1].join(300)  # the data owner first: a failed one would leave the owner waiting for it
    assert not errors, errors
    threads[0].join(60)
    assert not errors, errors
    assert summaries["owner"]["rounds"] == 2 and summaries["guest"]["syncs"] == 2
    result = summaries["guest"]
    assert 0.0 <= result["emulator_zero_shot_acc"] <= 1.0 and 0.0 <= result["emulator_fine_tuned_acc"] <= 1.0
    assert result["last_loss"] < result["first_loss"]
