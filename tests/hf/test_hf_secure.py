"""FedArguments(aggregator="secure") in an in-process federation of Trainers: the model the plain one gives,
within the quantisation error; parties that disagree are told. Over gRPC: tests/hf/test_hf_secure_grpc.py."""

from fedfleet.errors import ConfigError
from fedfleet.hf import FedArguments, LocalFederation
from fedfleet.secagg import SecAggConfig
from tests.hf.test_hf_local_federation import train_all
from tests.hf_parties import make_client, review_shares


def federate(tmp_path, name, aggregators, **federation):
    csvs = review_shares(tmp_path / "data", 2, reviews=32)
    fed = LocalFederation(2, timeout=120, **federation)
    clients = [
        make_client(
            fed.context(i), csvs[i], i, FedArguments("epoch", 1, aggregator), tmp_path / f"{name}{i}", epochs=2
        )[0]
        for i, aggregator in enumerate(aggregators)
    ]
    return fed, clients, train_all(clients)


def test_secure_aggregation_gives_the_plain_model_within_the_quantisation_error(tmp_path):
    fed, plain, errors = federate(tmp_path, "plain", ["plain", "plain"])
    assert errors == [None, None]
    fed, secure, errors = federate(tmp_path, "secure", ["secure", "secure_aggregate"])  # FATE-LLM's name too
    assert errors == [None, None]
    assert fed.loop.pipeline.secure is not None and len(fed.history) == 2
    a, b = plain[0].fed_sync.access.params, secure[0].fed_sync.access.params
    diff = max(float((x - y).abs().max()) for x, y in zip(a.buffers.values(), b.buffers.values(), strict=True))
    # two syncs of two parties, rounded in steps of 2 / 2**31: the models differ, by far less than training moves them
    assert 0 < diff < 1e-5
    assert secure[0].fed_sync.access.params.allclose(secure[1].fed_sync.access.params, rtol=0, atol=0)


def test_parties_that_disagree_on_the_aggregator_are_refused(tmp_path):
    _, _, errors = federate(tmp_path, "mixed", ["secure", "plain"])
    assert all(isinstance(e, ConfigError) for e in errors)
    assert "party-0 ask for aggregator='secure' and party-1 for 'plain'" in str(errors[0])


def test_the_federation_can_fix_the_settings(tmp_path):
    fed, _, errors = federate(tmp_path, "fixed", ["plain", "plain"], secure=SecAggConfig(bits=24, clip=0.5))
    assert errors == [None, None]
    assert fed.loop.pipeline.secure.config.bits == 24
