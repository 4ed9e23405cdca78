"""Masks made ahead of the update (prepare_masks): the round's sum stays the plain integer sum, exactly."""

import dataclasses
import os

import numpy as np
import pytest

from fedfleet.secagg import SecAggConfig, SecAggParty, SecAggRefused, SecAggServer
from fedfleet.secagg.masks import add_masks
from tests.secagg.helpers import make_inputs, plain_total


def keyed_round(n: int, m: int, config: SecAggConfig, seed: int = 0):
    """The server and parties of one round (graph seed 9) up to the inboxes, with plain_total's rounding."""
    inputs, weights = make_inputs(n, m, seed=seed)
    server = SecAggServer("s", 0, config, sorted(inputs), graph_seed=9, length=m)
    parties = {i: SecAggParty(i, "s", 0, config, server.plan, seed=(0, 0, i)) for i in inputs}
    for party in parties.values():
        server.receive_advert(party.advertise())
    for i, roster in server.rosters().items():
        server.receive_shares(i, parties[i].share_keys(roster))
    return inputs, weights, server, parties, server.inboxes()


def finish(server, parties):
    for i, request in server.unmask_requests().items():
        server.receive_unmask_reply(parties[i].unmask(request))
    return server.result()


@pytest.mark.parametrize("first_sign", [1, -1])
def test_overwriting_masks_equals_adding_them_into_zeros(first_sign):
    keys = [(os.urandom(16), first_sign), (os.urandom(16), 1), (os.urandom(16), -1)]
    acc = np.full(70_001, 12345, dtype=np.uint32)  # old values that must not count
    add_masks(acc, keys, chunk_bytes=4096, overwrite=True)
    zeros = np.zeros(70_001, dtype=np.uint32)
    add_masks(zeros, keys, chunk_bytes=4096)
    assert np.array_equal(acc, zeros)


def test_prepared_and_unprepared_parties_sum_exactly_with_dropouts_after_shares():
    config = SecAggConfig(neighbours=6)  # t = 4: the pairwise masks of the dropped parties are rebuilt
    inputs, weights, server, parties, inboxes = keyed_round(10, 3000, config, seed=3)
    dropped = {4, 7}
    parties[1].prepare_masks(inboxes[1], 3000, out=np.full(3001, 99, dtype=np.uint32))
    parties[2].prepare_masks(inboxes[2], 3000)
    parties[3].prepare_masks(inboxes[3], 2999)  # a size the update does not have: masked again at input
    parties[4].prepare_masks(inboxes[4], 3000)  # prepared, then gone before its input
    for i in sorted(set(inputs) - dropped):
        masked = parties[i].masked_input(inputs[i], weights[i], inboxes[i])
        assert masked.data.size == 3001
        server.receive_masked_input(masked)
    result = finish(server, parties)
    survivors = set(inputs) - dropped
    assert result.survivors == frozenset(survivors)
    assert result.total.tolist() == plain_total(inputs, weights, config, survivors).tolist()


def test_a_bad_inbox_withdraws_the_party_at_preparation_and_the_round_survives_it():
    config = SecAggConfig(neighbours=4)
    inputs, weights, server, parties, inboxes = keyed_round(6, 500, config)
    forged = [dataclasses.replace(s, ciphertext=bytes(len(s.ciphertext))) for s in inboxes[2]]
    with pytest.raises(SecAggRefused):
        parties[2].prepare_masks(forged, 500)
    with pytest.raises(SecAggRefused, match="withdrawn"):
        parties[2].masked_input(inputs[2], weights[2], inboxes[2])  # no input after a refusal
    for i in sorted(set(inputs) - {2}):
        parties[i].prepare_masks(inboxes[i], 500)
        server.receive_masked_input(parties[i].masked_input(inputs[i], weights[i], inboxes[i]))
    result = finish(server, parties)
    assert result.total.tolist() == plain_total(inputs, weights, config, set(inputs) - {2}).tolist()


def test_a_prepared_party_prepares_once_and_reveals_nothing_before_its_input():
    config = SecAggConfig(neighbours=4)
    inputs, weights, server, parties, inboxes = keyed_round(6, 200, config)
    parties[1].prepare_masks(inboxes[1], 200)
    with pytest.raises(SecAggRefused, match="'prepared'"):
        parties[1].prepare_masks(inboxes[1], 200)
    for i in sorted(set(inputs) - {1}):
        server.receive_masked_input(parties[i].masked_input(inputs[i], weights[i], inboxes[i]))
    request = server.unmask_requests()[2]
    with pytest.raises(SecAggRefused, match="'prepared'"):
        parties[1].unmask(dataclasses.replace(request, party=1))
