"""One party with a valid certificate attacks a secure round: every misaddressed, malformed or forged stage message
is refused and counted, and costs only the rogue (the round goes on as if it had dropped out at that stage)."""

import dataclasses
import threading

import pytest

from fedfleet.runtime.grpc import secure_wire
from fedfleet.runtime.grpc.secure_identity import Signer
from fedfleet.runtime.grpc.wire import SecAggAdvert, SecAggRoster, SecAggSetup, SecAggShares, Welcome
from fedfleet.secagg import SecAggConfig, SecAggParty
from tests.rogue import MisaddressedMaskedInput, RawStream
from tests.runtime.grpc.secure_helpers import PARTIES4, secure_federation
from tests.runtime.grpc.test_hostile_party import join_frame, run_with_deadline

ROGUE = PARTIES4[-1]
VALUES = secure_wire.config_values(SecAggConfig(clip=1.0, bits=16))


def test_masked_inputs_for_another_round_or_session_or_claiming_another_party_are_refused_and_counted(tmp_path):
    fed = secure_federation(tmp_path, ["rounds=2"], party_class={ROGUE: MisaddressedMaskedInput})
    history, _ = run_with_deadline(fed, 90)
    for record in history:
        m = record.metrics
        assert (m["rejected_stale"], m["rejected_session"], m["rejected_identity"]) == (1.0, 1.0, 1.0)
        assert m["clients"] == 4.0 and m["secagg_masked"] == 4.0  # its own, correctly addressed, still counts


def next_of(stream, kind, timeout=30.0):
    """The next message of ``kind`` the arbiter sends (heartbeat-free: the arbiter sends none)."""
    while True:
        msg = stream.next_message(timeout)
        if isinstance(msg, kind):
            return msg


def rogue_round(fed, certs, script):
    """A rogue on a raw stream joins the secure session and, at the setup, runs ``script(stream, setup)``."""
    errors = []

    def play():
        try:
            stream = RawStream(fed.job.network.address, certs, ROGUE)
            stream.send(join_frame(fed, ROGUE, secure_aggregation=VALUES))
            assert isinstance(stream.next_message(), Welcome)
            script(stream, next_of(stream, SecAggSetup))
        except Exception as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    return play, errors


def advert_of(setup, certs, signer=ROGUE, signed_keys=None):
    """The rogue's honest advert for ``setup`` (its keys signed with ``signer``'s certificate), and its keys."""
    config = SecAggConfig(**setup.config)
    protocol = SecAggParty(setup.party, setup.session, setup.round, config, config.validate(setup.n))
    advert = protocol.advertise()
    keys = signed_keys or (advert.cipher_pk, advert.mask_pk)
    signed = Signer(certs, signer).sign(setup.session, setup.round, setup.party, *keys)
    header = {"task_id": setup.task_id, "round": setup.round, "session": setup.session, "party": setup.party}
    return SecAggAdvert(**header, cipher_pk=advert.cipher_pk.hex(), mask_pk=advert.mask_pk.hex(),
                        payload=secure_wire.encode_signed(signed))  # fmt: skip


def test_misaddressed_stage_messages_are_counted_and_a_malformed_body_drops_only_the_rogue(tmp_path):
    certs = tmp_path / "certs"

    def script(stream, setup):
        good = advert_of(setup, certs)
        for change in ({"party": setup.party % 4 + 1}, {"session": "another-session"}, {"round": setup.round + 1},
                       {"task_id": "an-old-task"}):  # fmt: skip
            stream.send(dataclasses.replace(good, **change))
        stream.send(good)  # accepted: the rogue is in the share graph
        roster = next_of(stream, SecAggRoster)
        header = {"task_id": roster.task_id, "round": roster.round, "session": roster.session, "party": roster.party}
        stream.send(SecAggShares(**header, payload=b"\x00" * 5))  # not whole records

    fed = secure_federation(tmp_path, ["rounds=1", "network.min_parties=3"], skip={ROGUE})
    play, errors = rogue_round(fed, certs, script)
    (record,), _ = run_with_deadline(fed, 90, before_parties=lambda: threading.Thread(target=play).start())
    assert not errors, errors
    m = record.metrics
    assert [m[f"rejected_{k}"] for k in ("identity", "session", "stale", "replay", "secagg")] == [1.0] * 5
    assert (m["secagg_advertised"], m["secagg_shared"], m["clients"]) == (4.0, 3.0, 3.0)  # dropped after its advert


@pytest.mark.parametrize(
    "forgery",
    [
        {"signer": "guest-9999"},  # another party's certificate (its key too: the test holds every key)
        {"signed_keys": (b"\x01" * 32, b"\x02" * 32)},  # a signature over other keys than the advertised ones
    ],
)
def test_an_advert_not_signed_by_its_own_certificate_over_its_own_keys_is_refused(tmp_path, forgery):
    certs = tmp_path / "certs"
    fed = secure_federation(tmp_path, ["rounds=1", "network.min_parties=3"], skip={ROGUE})
    play, errors = rogue_round(fed, certs, lambda stream, setup: stream.send(advert_of(setup, certs, **forgery)))
    (record,), _ = run_with_deadline(fed, 90, before_parties=lambda: threading.Thread(target=play).start())
    assert not errors, errors
    m = record.metrics
    assert (m["rejected_secagg"], m["secagg_advertised"], m["clients"]) == (1.0, 3.0, 3.0)  # out before its advert
