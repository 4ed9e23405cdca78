"""FATE-LLM's Offsite-Tuning tutorial on fedfleet: its GPT2LMHeadMainModel and GPT2LMHeadSubModel as the tutorial
writes them (only the imports changed: the embeddings go out as ten row pieces, ``wte0`` .. ``wte9``), a QA task,
two data owners and ``aggregate_model=True``.

    python examples/offsite/fate_tutorial.py --insecure        # the owner and two data owners, one process each

or one role per terminal (mTLS with certificates from `fedfleet certs`, or --insecure on a trusted network):

    python examples/offsite/fate_tutorial.py --role arbiter --party-id 10000
    python examples/offsite/fate_tutorial.py --role guest --party-id 9999
    python examples/offsite/fate_tutorial.py --role host --party-id 10000

``--model-path`` is the tutorial's ``model_name_or_path``: a ``save_pretrained`` GPT-2 folder (fedfleet downloads
nothing; the tutorial's ``'gpt2'`` names the hub's). Without it a small GPT-2 with random weights is saved under
``--work`` first, the same on every side. The QA data is MMLU's worked questions from the lm-eval wheel (the
tutorial's SciQ would be a download), each data owner a share; each prints its held-out multiple-choice accuracy
before and after, and the owner saves the full model with the tuned adapters plugged in.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
from pathlib import Path

from transformers import GPT2Config, GPT2LMHeadModel

from fedfleet.offsite import OffsiteTuningMainModel, OffsiteTuningSubModel, recover_numpy_array, split_numpy_array


# -- the tutorial's classes: the same code, the two imports above instead of fate_llm's ---------------------------
class GPT2LMHeadMainModel(OffsiteTuningMainModel):
    def __init__(self, model_name_or_path, emulator_layer_num: int, adapter_top_layer_num: int = 2,
                 adapter_bottom_layer_num: int = 2):  # fmt: skip
        self.model_name_or_path = model_name_or_path
        super().__init__(emulator_layer_num, adapter_top_layer_num, adapter_bottom_layer_num)

    def get_base_model(self):
        return GPT2LMHeadModel.from_pretrained(self.model_name_or_path)

    def get_model_transformer_blocks(self, model: GPT2LMHeadModel):
        return model.transformer.h

    def forward(self, x):
        return self.model(**x)

    def get_additional_param_state_dict(self):
        return _ten_pieces(self)

    def load_additional_param_state_dict(self, submodel_weights: dict):
        _join_pieces(self, submodel_weights)


class GPT2LMHeadSubModel(OffsiteTuningSubModel):
    def __init__(self, model_name_or_path, emulator_layer_num: int, adapter_top_layer_num: int = 2,
                 adapter_bottom_layer_num: int = 2, fp16_mix_precision=False,
                 partial_weight_decay=None):  # fmt: skip
        self.model_name_or_path = model_name_or_path
        self.emulator_layer_num = emulator_layer_num
        self.adapter_top_layer_num = adapter_top_layer_num
        self.adapter_bottom_layer_num = adapter_bottom_layer_num
        super().__init__(emulator_layer_num, adapter_top_layer_num, adapter_bottom_layer_num, fp16_mix_precision)
        self.partial_weight_decay = partial_weight_decay

    def get_base_model(self):
        total_layer_num = self.emulator_layer_num + self.adapter_top_layer_num + self.adapter_bottom_layer_num
        config = GPT2Config.from_pretrained(self.model_name_or_path)
        config.num_hidden_layers = total_layer_num
        return GPT2LMHeadModel(config)  # random weights: the owner's arrive in the hand-out

    def get_model_transformer_blocks(self, model: GPT2LMHeadModel):
        return model.transformer.h

    def get_additional_param_state_dict(self):
        return _ten_pieces(self)

    def load_additional_param_state_dict(self, submodel_weights: dict):
        _join_pieces(self, submodel_weights)

    def forward(self, x):
        return self.model(**x)

    def parameters(self, recurse=True):
        if self.partial_weight_decay is None:
            return super().parameters(recurse)
        if isinstance(self.partial_weight_decay, float):
            no_decay = ["bias", "layer_norm.weight"]
            named = list(self.named_parameters())
            return [
                {"params": [p for n, p in named if not any(nd in n for nd in no_decay)],
                 "weight_decay": self.partial_weight_decay},
                {"params": [p for n, p in named if any(nd in n for nd in no_decay)], "weight_decay": 0.0},
            ]  # fmt: skip
        raise ValueError(f"partial_weight_decay should be None or float, but got {self.partial_weight_decay}")


def _shared(model):
    return {"wte": model.transformer.wte, "wpe": model.transformer.wpe, "last_ln_f": model.transformer.ln_f}


def _ten_pieces(self):
    """The tutorial's get_additional_param_state_dict (both classes have the same one)."""
    addition_weights = self.get_numpy_state_dict(_shared(self.model))
    wte = addition_weights.pop("wte")
    wte_dict = split_numpy_array(wte, 10, "wte")
    wpe = addition_weights.pop("wpe")
    wpe_dict = split_numpy_array(wpe, 10, "wpe")
    addition_weights.update(wte_dict)
    addition_weights.update(wpe_dict)
    return addition_weights


def _join_pieces(self, submodel_weights):
    """The tutorial's load_additional_param_state_dict."""
    new_submodel_weight = {"last_ln_f": submodel_weights["last_ln_f"]}
    wte_dict, wpe_dict = {}, {}
    for k, v in submodel_weights.items():
        if "wte" in k:
            wte_dict[k] = v
        if "wpe" in k:
            wpe_dict[k] = v
    new_submodel_weight["wte"] = recover_numpy_array(wte_dict, "wte")
    new_submodel_weight["wpe"] = recover_numpy_array(wpe_dict, "wpe")
    self.load_numpy_state_dict(_shared(self.model), new_submodel_weight)


# -- the tutorial's pipeline, as fedfleet calls ------------------------------------------------------------------
PARTIES = [("guest", "9999"), ("host", "10000"), ("arbiter", "10000")]
LAYERS = (4, 1, 1)  # emulator_layer_num, adapter_top_layer_num, adapter_bottom_layer_num, as in the tutorial


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", choices=["guest", "host", "arbiter"], help="this process's role (default: start all)")
    p.add_argument("--party-id", help="this party's id (guest 9999, host 10000, arbiter 10000)")
    p.add_argument("--address", default="127.0.0.1:50061", help="the owner's tuning address (hand-out: port + 1)")
    p.add_argument("--certs", default="certs", help="folder from `fedfleet certs`")
    p.add_argument("--insecure", action="store_true", help="plaintext, for a trusted network only")
    p.add_argument("--model-path", help="a save_pretrained GPT-2 folder (default: a small random one)")
    p.add_argument("--work", default="runs/fate-tutorial", help="folder for the model and the outputs")
    p.add_argument("--questions", type=int, default=120, help="MMLU questions per data owner")
    p.add_argument("--held-out", type=int, default=20, help="of them, kept out of training for the accuracy")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per data owner")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--max-length", type=int, default=128, help="tokens of question and answer")
    return p.parse_args(argv)


def model_path(args: argparse.Namespace) -> str:
    if args.model_path:
        return args.model_path
    path = Path(args.work) / "gpt2"
    if not (path / "config.json").is_file():  # every side writes the same one (data owners read only its config)
        import contextlib
        import os
        import tempfile

        import torch

        from fedfleet.hf.data import gpt2_tokenizer

        torch.manual_seed(0)
        vocab = len(gpt2_tokenizer())
        config = GPT2Config(n_layer=8, n_embd=64, n_head=4, n_positions=args.max_length, vocab_size=vocab)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=path.parent)
        GPT2LMHeadModel(config).save_pretrained(tmp)
        with contextlib.suppress(OSError):  # another side was first: the same model
            os.rename(tmp, path)  # whole or not at all: a side starting meanwhile never reads half a folder
    return str(path)


def owner(ctx, args: argparse.Namespace) -> dict:
    from fedfleet.offsite.session import OffsiteTuningServer

    main = GPT2LMHeadMainModel(model_path(args), *LAYERS)
    history = OffsiteTuningServer(ctx=ctx, model=main, aggregate_model=True).train()
    main.model.save_pretrained(Path(args.work) / "plugged_in")
    return {"role": "owner", "rounds": len(history), "saved": str(Path(args.work) / "plugged_in")}


def data_owner(ctx, args: argparse.Namespace, share: int) -> dict:
    from transformers import Seq2SeqTrainingArguments

    from fedfleet.hf import FedAVGArguments
    from fedfleet.hf.data import QaDataset, Seq2SeqCollator, gpt2_tokenizer, mmlu_questions
    from fedfleet.offsite.evaluate import choice_accuracy
    from fedfleet.offsite.session import OffsiteTuningClient

    tok = gpt2_tokenizer()
    pairs = mmlu_questions(reasoning=False)[share * args.questions : (share + 1) * args.questions]
    train, test = pairs[args.held_out :], pairs[: args.held_out]
    sub = GPT2LMHeadSubModel(model_path(args), *LAYERS)
    client = OffsiteTuningClient(
        ctx=ctx,
        model=sub,
        aggregate_model=True,
        fed_args=FedAVGArguments(),  # one sync, at the end of the (one) epoch
        training_args=Seq2SeqTrainingArguments(
            output_dir=str(Path(args.work) / ctx.name),
            per_device_train_batch_size=4,
            learning_rate=args.lr,
            max_steps=args.steps,
            logging_steps=10,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
        ),
        train_set=QaDataset(tok, train, max_length=args.max_length),
        data_collator=Seq2SeqCollator.for_tokenizer(tok),  # the tutorial's DataCollatorForSeq2Seq: see the docs
        tokenizer=tok,
    )
    room = args.max_length - 8  # the prompt's tokens beside " The answer is (X)." (6 GPT-2 tokens)
    before = choice_accuracy(sub.model, tok, test, max_prompt=room)
    client.train()
    after = choice_accuracy(sub.model, tok, test, max_prompt=room)
    return {"role": ctx.name, "syncs": client.fed_sync.syncs, "acc_before": before, "acc_after": after}


def run_role(args: argparse.Namespace) -> int:
    from fedfleet.hf import create_context

    ctx = create_context((args.role, args.party_id), PARTIES, "fate-tutorial", args.address, certs=args.certs,
                         insecure=args.insecure)  # fmt: skip
    owners = [f"{r}-{i}" for r, i in PARTIES if r != "arbiter"]
    summary = owner(ctx, args) if ctx.is_arbiter else data_owner(ctx, args, owners.index(ctx.name))
    print(json.dumps(summary), flush=True)
    return 0


def free_pair() -> int:
    """A loopback port whose next port is free too (the hand-out listens on port + 1)."""
    while True:
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            try:
                b.bind(("127.0.0.1", a.getsockname()[1] + 1))
            except OSError:
                continue
            return a.getsockname()[1]


def run_all(argv: list[str]) -> int:
    """Every role as its own process, on free loopback ports."""
    model_path(parse(argv))  # once, before the sides start
    common = [*argv, "--address", f"127.0.0.1:{free_pair()}"]
    procs = [subprocess.Popen([sys.executable, __file__, *common, "--role", r, "--party-id", i]) for r, i in PARTIES]
    codes = [p.wait() for p in procs]
    return max(codes)


if __name__ == "__main__":
    arguments = parse(sys.argv[1:])
    sys.exit(run_role(arguments) if arguments.role else run_all(sys.argv[1:]))
