"""FATE-LLM's Offsite-Tuning keywords: model= for the main or sub model, aggregate_model=, refused at once
when they cannot mean the same (a data owner must fail before the hand-out, not leave the owner waiting)."""

import threading

import pytest

from fedfleet.errors import ConfigError
from fedfleet.hf import LocalFederation, create_context
from fedfleet.offsite import AutoMainModel
from fedfleet.offsite.session import OffsiteTuningClient, OffsiteTuningServer
from tests.offsite_helpers import tiny_config

PARTIES = [("guest", "1"), ("host", "2"), ("arbiter", "3")]


def test_the_owner_takes_fates_model_keyword_for_the_main_model():
    main = AutoMainModel(tiny_config(4), 2, 1, 1)
    ctx = create_context(("arbiter", "3"), PARTIES, "s-fate", insecure=True)
    server = OffsiteTuningServer(ctx=ctx, model=main, aggregate_model=True)
    assert server.main is main
    with pytest.raises(ConfigError, match="main= or model="):
        OffsiteTuningServer(ctx, main, model=main)


def test_a_data_owner_refuses_aggregate_model_false_before_waiting_for_the_hand_out():
    ctx = LocalFederation(2).context(0)
    errors = []

    def build():
        try:
            OffsiteTuningClient(ctx, model=object(), aggregate_model=False)
        except ConfigError as exc:
            errors.append(exc)

    thread = threading.Thread(target=build, daemon=True)
    thread.start()
    thread.join(10)  # it would wait for the owner's hand-out, were it checked after
    assert not thread.is_alive() and "aggregate_model=False" in str(errors[0])
