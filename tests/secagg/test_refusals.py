"""An honest party refuses what a lying server asks; the server refuses what it should not fold."""

import dataclasses

import numpy as np
import pytest

from fedfleet.secagg import SecAggConfig, SecAggRefused, UnmaskRequest
from tests.secagg.helpers import HandRound, make_inputs, plain_total


def hand(n=8, k=None, m=200, **kw):
    inputs, weights = make_inputs(n, m, seed=11)
    return HandRound(inputs, weights, SecAggConfig(neighbours=k), **kw)


def test_both_kinds_of_share_of_one_peer_in_one_request_are_refused():
    r = hand()
    requests = r.to_unmask()
    honest = requests[1]
    lie = dataclasses.replace(honest, dropped=frozenset({2}))  # 2 is also in alive
    with pytest.raises(SecAggRefused, match=r"calls \[2\] both alive and dropped"):
        r.parties[1].unmask(lie)


@pytest.mark.parametrize("first_kind", ["self", "key"])
def test_the_second_kind_of_share_of_one_peer_is_refused_across_requests(first_kind):
    r = hand()
    honest = r.to_unmask()[1]
    as_alive = honest
    as_dropped = dataclasses.replace(honest, alive=honest.alive - {2}, dropped=frozenset({2}))
    first, second = (as_alive, as_dropped) if first_kind == "self" else (as_dropped, as_alive)
    reply = r.parties[1].unmask(first)
    assert (2 in reply.self_shares) == (first_kind == "self") and (2 in reply.key_shares) == (first_kind == "key")
    with pytest.raises(SecAggRefused, match=r"refuses to reveal the second kind of share of \[2\]"):
        r.parties[1].unmask(second)
    assert r.parties[1].unmask(first) == reply  # the same question again gets the same answer


def test_requests_that_drop_the_party_name_strangers_or_leave_too_few_alive_are_refused():
    r = hand(n=12, k=4)  # t = 3 of 4
    requests = r.to_unmask()
    p = r.parties[1]
    near = sorted(p.neighbours)
    honest = requests[1]
    stranger = next(i for i in r.parties if i not in p.neighbours and i != 1)
    cases = [
        (dataclasses.replace(honest, alive=honest.alive - {1}, dropped=honest.dropped | {1}), "does not count this"),
        (dataclasses.replace(honest, alive=honest.alive | {stranger}), "not its neighbours"),
        (dataclasses.replace(honest, alive=frozenset({1, near[0]}), dropped=frozenset(near[1:])), "fewer than the"),
        (dataclasses.replace(honest, session="other"), "session 'other'"),
        (dataclasses.replace(honest, round=1), "round 1"),
        (dataclasses.replace(honest, party=2), "party 2"),
    ]
    for request, message in cases:
        with pytest.raises(SecAggRefused, match=message):
            p.unmask(request)
    assert p.unmask(honest).self_shares.keys() == honest.alive - {1}  # nothing was revealed by the refusals


def test_a_party_that_has_not_sent_its_input_answers_no_unmask_request():
    r = hand()
    inboxes = r.share(r.advertise())
    r.mask(inboxes, skip={3})
    request = UnmaskRequest("s", 0, 3, frozenset(r.parties), frozenset())
    with pytest.raises(SecAggRefused, match="while at 'shared'"):
        r.parties[3].unmask(request)


def forged_inbox(kind: str, relabelled: bool):
    """Round 1 of session "s" with party 1's inbox holding one forged share in place of its sender's: a share
    from another round or session, or one addressed to party 2; as it was sent, or relabelled to look right."""
    r = hand(n=6, m=100, session="s", round=1)
    inboxes = r.share(r.advertise())
    if kind == "receiver":
        bad = next(s for s in inboxes[2] if s.sender != 1)
        relabel = {"receiver": 1}
    else:
        other = hand(n=6, m=100, session="t" if kind == "session" else "s", round=2 if kind == "round" else 1)
        bad = next(s for s in other.share(other.advertise())[1] if s.sender == inboxes[1][0].sender)
        relabel = {"session": "s", "round": 1}
    if relabelled:
        bad = dataclasses.replace(bad, **relabel)
    forged = [bad if s.sender == bad.sender else s for s in inboxes[1]]
    return r, inboxes, forged


@pytest.mark.parametrize("relabelled", [False, True], ids=["as-sent", "relabelled"])
@pytest.mark.parametrize("kind", ["round", "session", "receiver"])
def test_replayed_or_misaddressed_shares_are_refused_and_the_round_survives_the_withdrawal(kind, relabelled):
    r, inboxes, forged = forged_inbox(kind, relabelled)
    # as sent, the context check refuses it; relabelled, the AES-GCM tag does (another key, another AAD)
    with pytest.raises(SecAggRefused, match="tag" if relabelled else "refused a share from"):
        r.parties[1].masked_input(r.inputs[1], r.weights[1], forged)
    with pytest.raises(SecAggRefused, match="withdrawn"):  # withdrawn for the round: no second try
        r.parties[1].masked_input(r.inputs[1], r.weights[1], inboxes[1])
    r.mask(inboxes, skip={1})
    result = r.finish(r.server.unmask_requests())
    assert result.survivors == frozenset(r.parties) - {1}
    expected = plain_total(r.inputs, r.weights, r.config, result.survivors, round=1)
    assert result.total.tolist() == expected.tolist()


def test_a_tampered_ciphertext_fails_its_tag():
    r = hand(n=5)
    inboxes = r.share(r.advertise())
    s = inboxes[1][0]
    flipped = dataclasses.replace(s, ciphertext=s.ciphertext[:-1] + bytes([s.ciphertext[-1] ^ 1]))
    with pytest.raises(SecAggRefused, match="tag"):
        r.parties[1].masked_input(r.inputs[1], r.weights[1], [flipped, *inboxes[1][1:]])


def test_a_roster_that_does_not_match_the_graph_is_refused():
    r = hand(n=10, k=4)
    rosters = r.advertise()
    roster = rosters[1]
    extra = next(i for i in r.parties if i not in roster.cipher_pks and i != 1)
    forged = dataclasses.replace(
        roster,
        cipher_pks={**roster.cipher_pks, extra: rosters[extra].cipher_pks[next(iter(rosters[extra].cipher_pks))]},
    )
    with pytest.raises(SecAggRefused, match="not those of its neighbours"):
        r.parties[1].share_keys(forged)


def test_the_server_refuses_strangers_duplicates_late_and_malformed_messages():
    r = hand(n=5, m=50)
    adverts = {i: p.advertise() for i, p in r.parties.items()}
    for a in adverts.values():
        r.server.receive_advert(a)
    with pytest.raises(SecAggRefused, match="second advert"):
        r.server.receive_advert(adverts[1])
    with pytest.raises(SecAggRefused, match="not in this stage"):
        r.server.receive_advert(dataclasses.replace(adverts[1], party=99))
    with pytest.raises(SecAggRefused, match="round 4"):
        r.server.receive_advert(dataclasses.replace(adverts[1], round=4))
    rosters = r.server.rosters()
    with pytest.raises(SecAggRefused, match="stage is not open"):
        r.server.receive_advert(adverts[1])
    shares = {i: r.parties[i].share_keys(rosters[i]) for i in rosters}
    with pytest.raises(SecAggRefused, match="one for each of its neighbours"):
        r.server.receive_shares(1, shares[1][:-1])
    with pytest.raises(SecAggRefused, match="another session, round or sender"):
        r.server.receive_shares(1, shares[2])
    for i, s in shares.items():
        r.server.receive_shares(i, s)
    inboxes = r.server.inboxes()
    masked = {i: r.parties[i].masked_input(r.inputs[i], r.weights[i], inboxes[i]) for i in inboxes}
    with pytest.raises(SecAggRefused, match="not a flat uint32 vector"):
        r.server.receive_masked_input(dataclasses.replace(masked[1], data=masked[1].data.astype(np.uint64)))
    r.server.receive_masked_input(masked[1])
    with pytest.raises(SecAggRefused, match="has 10 params, the round has 50"):
        r.server.receive_masked_input(dataclasses.replace(masked[2], data=masked[2].data[:11]))
    with pytest.raises(SecAggRefused, match="second masked input"):
        r.server.receive_masked_input(masked[1])
    for i in (2, 3, 4):
        r.server.receive_masked_input(masked[i])
    requests = r.server.unmask_requests()
    with pytest.raises(SecAggRefused, match="stage is not open"):
        r.server.receive_masked_input(masked[5])  # late: party 5 now counts as dropped
    reply = r.parties[1].unmask(requests[1])
    with pytest.raises(SecAggRefused, match="not asked for"):
        r.server.receive_unmask_reply(dataclasses.replace(reply, key_shares={2: 1}))
    with pytest.raises(SecAggRefused, match="outside the field"):
        r.server.receive_unmask_reply(dataclasses.replace(reply, self_shares=dict.fromkeys(reply.self_shares, -1)))
    r.server.receive_unmask_reply(reply)
    for i in (2, 3, 4):
        r.server.receive_unmask_reply(r.parties[i].unmask(requests[i]))
    result = r.server.result()
    assert result.survivors == frozenset({1, 2, 3, 4})
    assert result.total.tolist() == plain_total(r.inputs, r.weights, r.config, {1, 2, 3, 4}).tolist()


def test_non_finite_updates_are_refused_by_the_party_before_masking():
    r = hand(n=4, m=10)
    inboxes = r.share(r.advertise())
    bad = r.inputs[1].copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        r.parties[1].masked_input(bad, 1.0, inboxes[1])
    with pytest.raises(ValueError, match="weight must be a finite number > 0"):
        r.parties[1].masked_input(r.inputs[1], 0.0, inboxes[1])
