"""Whole rounds: the unmasked sum is the plain integer sum of the survivors' quantised inputs, exactly, whatever
stage parties drop out at, for the complete graph and k-regular ones."""

import numpy as np
import pytest
import torch

from fedfleet.core.params import FlatParams
from fedfleet.secagg import SecAggConfig, SecAggFailed, SecAggParty, SecAggServer, Stage, graph, run_round
from fedfleet.secagg.in_process import flatten, mean_params
from tests.secagg.helpers import make_inputs, plain_total, true_mean


def check_exact(inputs, weights, config, result, survivors, seed=0, round=0):
    assert result.survivors == frozenset(survivors)
    expected = plain_total(inputs, weights, config, survivors, seed, round)
    assert result.total.tolist() == expected.tolist()
    assert np.abs(result.mean() - true_mean(inputs, weights, config, survivors)).max() < result.mean_bound()
    capped = sum(min(weights[i], config.max_weight) for i in survivors)
    assert abs(result.weight - capped) <= result.factors_bound * config.max_weight


def test_no_dropouts_complete_graph():
    inputs, weights = make_inputs(8, 3000)
    config = SecAggConfig()  # k = n - 1: Bonawitz et al.'s SecAgg
    result = run_round(inputs, weights, config)
    check_exact(inputs, weights, config, result, set(inputs))
    assert result.total.dtype == np.uint32


def test_the_bound_is_one_step_per_party_and_is_tight_enough_to_mean_something():
    inputs, weights = make_inputs(8, 3000)
    config = SecAggConfig(bits=16)
    result = run_round(inputs, weights, config)
    assert result.sum_bound == pytest.approx(8 * 2 / 65535)
    assert result.mean_bound() < 1e-3


@pytest.mark.parametrize(
    ("stage", "who"),
    [
        (Stage.ADVERTISE, {3}),
        (Stage.SHARE, {3, 10}),
        (Stage.MASKED_INPUT, {3, 10}),
        (Stage.UNMASK, {3, 10}),
        (Stage.DURING_UNMASK, {3, 10, 11}),
    ],
)
def test_one_stage_of_dropouts_k_regular(stage, who):
    inputs, weights = make_inputs(12, 2000, seed=1)
    config = SecAggConfig(neighbours=6)  # t = 4 of 6
    result = run_round(inputs, weights, config, drop={stage: who}, seed=5)
    gone_before_input = stage in (Stage.ADVERTISE, Stage.SHARE, Stage.MASKED_INPUT)
    survivors = set(inputs) - who if gone_before_input else set(inputs)
    check_exact(inputs, weights, config, result, survivors, seed=5)


def test_dropouts_at_every_stage_at_once():
    # each party loses at most 4 of its 10 share holders: 6 = t remain
    inputs, weights = make_inputs(20, 1500, seed=2)
    config = SecAggConfig(neighbours=10, threshold=6)
    drop = {
        Stage.ADVERTISE: {1},
        Stage.SHARE: {2},
        Stage.MASKED_INPUT: {3},
        Stage.UNMASK: {5},
        Stage.DURING_UNMASK: {6},
    }
    result = run_round(inputs, weights, config, drop=drop)
    check_exact(inputs, weights, config, result, set(inputs) - {1, 2, 3})
    # and on the complete graph (t = 12 of 22 after one party did not advertise), with more of each
    inputs, weights = make_inputs(23, 1000, seed=3)
    config = SecAggConfig()
    drop = {
        Stage.ADVERTISE: {1},
        Stage.SHARE: {2, 7},
        Stage.MASKED_INPUT: {3, 4},
        Stage.UNMASK: {5, 8},
        Stage.DURING_UNMASK: {6, 9},
    }
    result = run_round(inputs, weights, config, drop=drop)
    check_exact(inputs, weights, config, result, set(inputs) - {1, 2, 7, 3, 4})


def test_odd_n_with_odd_k_runs_on_the_rounded_up_graph():
    inputs, weights = make_inputs(11, 1000, seed=3)
    config = SecAggConfig(neighbours=3)
    assert config.validate(11).degree == 4
    result = run_round(inputs, weights, config, drop={Stage.MASKED_INPUT: {4}})
    check_exact(inputs, weights, config, result, set(inputs) - {4})


def test_even_k_on_odd_n_and_odd_k_on_even_n():
    for n, k in ((9, 4), (10, 3)):
        inputs, weights = make_inputs(n, 500, seed=n)
        config = SecAggConfig(neighbours=k)
        result = run_round(inputs, weights, config, drop={Stage.MASKED_INPUT: {2}})
        check_exact(inputs, weights, config, result, set(inputs) - {2})


def test_a_64_bit_ring_when_32_bits_could_overflow():
    inputs, weights = make_inputs(5, 1000, seed=4)
    config = SecAggConfig(bits=31)  # 5 * (2**31 - 1) >= 2**32
    result = run_round(inputs, weights, config, drop={Stage.MASKED_INPUT: {1}})
    assert result.total.dtype == np.uint64
    check_exact(inputs, weights, config, result, set(inputs) - {1})


def test_party_ids_need_not_be_contiguous_and_the_seed_repeats_the_result_bit_for_bit():
    inputs, weights = make_inputs(6, 800, seed=6, first=1)
    inputs = {i * 7 + 100: v for i, v in inputs.items()}
    weights = {i * 7 + 100: w for i, w in weights.items()}
    config = SecAggConfig(neighbours=4)
    a = run_round(inputs, weights, config, session="job", round=3, seed=9)
    b = run_round(inputs, weights, config, session="job", round=3, seed=9)
    assert np.array_equal(a.sum, b.sum) and a.factors == b.factors
    check_exact(inputs, weights, config, a, set(inputs), seed=9, round=3)


def test_too_few_unmask_replies_fail_the_round():
    inputs, weights = make_inputs(10, 500)
    config = SecAggConfig()  # complete graph, t = 5 of 9
    with pytest.raises(SecAggFailed, match="fewer than the threshold 5"):
        run_round(inputs, weights, config, drop={Stage.UNMASK: {1, 2, 3, 4, 5}, Stage.DURING_UNMASK: {6}})
    # four lost replies leave five holders of every secret: still enough
    result = run_round(inputs, weights, config, drop={Stage.UNMASK: {1, 2, 3, 4}})
    check_exact(inputs, weights, config, result, set(inputs))


def test_below_the_threshold_of_live_parties_the_round_fails_before_anyone_reveals_a_share():
    inputs, weights = make_inputs(10, 500)
    config = SecAggConfig()
    with pytest.raises(SecAggFailed, match="only 4 parties sent masked inputs, fewer than the threshold 5"):
        run_round(inputs, weights, config, drop={Stage.MASKED_INPUT: {1, 2, 3, 4, 5, 6}})


def test_too_few_advertisers_fail_the_round_at_the_roster():
    inputs, weights = make_inputs(10, 100)
    config = SecAggConfig(neighbours=6, threshold=5)
    with pytest.raises(SecAggFailed, match="only 5 of 10 parties advertised keys"):
        run_round(inputs, weights, config, drop={Stage.ADVERTISE: {1, 2, 3, 4, 5}})


def test_a_party_whose_shares_reached_too_few_sharing_neighbours_fails_the_round_before_any_input():
    inputs, weights = make_inputs(12, 300, seed=8)
    config = SecAggConfig(neighbours=4, threshold=3)
    graph_seed = int(np.random.SeedSequence([0, 0]).generate_state(1, np.uint64)[0] >> 1)  # run_round's
    near = graph.neighbours(sorted(inputs), 4, graph_seed)[6]
    with pytest.raises(SecAggFailed, match=r"party \d+'s shares reached only [0-2] neighbours that shared theirs"):
        run_round(inputs, weights, config, drop={Stage.SHARE: set(sorted(near)[:2])})


def test_a_cohort_of_hundreds_with_k_two_log2_n_and_scattered_dropouts():
    inputs, weights = make_inputs(200, 1000, seed=12)
    config = SecAggConfig(neighbours=round(2 * np.log2(200)))  # k = 15 (odd k on an even n: a 15-regular graph)
    rng = np.random.default_rng(0)
    picked = rng.choice(np.arange(1, 201), size=10, replace=False).tolist()
    drop = {Stage.SHARE: set(picked[:3]), Stage.MASKED_INPUT: set(picked[3:7]), Stage.UNMASK: set(picked[7:])}
    result = run_round(inputs, weights, config, drop=drop, seed=1)
    check_exact(inputs, weights, config, result, set(inputs) - set(picked[:7]), seed=1)


def test_the_mean_written_into_params_a_chunk_at_a_time_is_mean_bit_for_bit():
    like = FlatParams.from_tensors({"a": torch.zeros(700), "b": torch.zeros(5, dtype=torch.float64),
                                    "c": torch.zeros(13, 11, dtype=torch.bfloat16)})  # fmt: skip
    inputs, weights = make_inputs(6, like.numel)
    result = run_round(inputs, weights, SecAggConfig(neighbours=3, threshold=2))
    mean = result.mean()
    params = mean_params(result, like, chunk=64)  # chunks that straddle the dtype buffers' ends
    offset = 0
    for dtype in sorted(params.buffers, key=str):  # flatten's order
        buffer = params.buffers[dtype]
        assert torch.equal(buffer, torch.from_numpy(mean[offset : offset + buffer.numel()]).to(dtype))
        offset += buffer.numel()
    assert offset == mean.size and np.array_equal(flatten(params), flatten(mean_params(result, like)))


def test_a_party_masks_into_a_buffer_it_is_given_and_refuses_one_of_the_wrong_shape():
    inputs, weights = make_inputs(3, 50)
    config = SecAggConfig()
    server = SecAggServer("s", 0, config, [1, 2, 3], 5, length=50)
    parties = {i: SecAggParty(i, "s", 0, config, server.plan, seed=(0, 0, i)) for i in inputs}  # plain_total's
    for party in parties.values():
        server.receive_advert(party.advertise())
    for i, roster in server.rosters().items():
        server.receive_shares(i, parties[i].share_keys(roster))
    inbox = server.inboxes()
    with pytest.raises(ValueError, match="out must be a flat 51 x uint32"):
        parties[1].masked_input(inputs[1], weights[1], inbox[1], out=np.zeros(50, np.uint32))
    for i in inputs:
        given = np.full(51, 7, dtype=np.uint32)  # what an earlier round left in it
        masked = parties[i].masked_input(inputs[i], weights[i], inbox[i], out=given)
        assert masked.data is given
        server.receive_masked_input(masked)
    for i, request in server.unmask_requests().items():
        server.receive_unmask_reply(parties[i].unmask(request))
    assert server.result().total.tolist() == plain_total(inputs, weights, config, set(inputs)).tolist()
