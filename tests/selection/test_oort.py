"""Oort: utility from what clients reported, exploration, exploitation, pacer, blacklist."""

import numpy as np
import pytest
import torch

from fedfleet.core.checkpoint import CheckpointMismatchError, load_checkpoint, save_checkpoint
from fedfleet.core.params import FlatParams
from fedfleet.core.round_end import RoundFeedback
from fedfleet.select import OortSelector, build_selector


def report(clients, loss, duration, samples=50.0, completed=None) -> RoundFeedback:
    clients = np.asarray(clients, dtype=np.int64)
    n = len(clients)
    return RoundFeedback(
        clients,
        np.ones(n, dtype=bool) if completed is None else np.asarray(completed),
        np.broadcast_to(np.asarray(loss, dtype=float), (n,)).copy(),
        np.full(n, samples),
        np.broadcast_to(np.asarray(duration, dtype=float), (n,)).copy(),
    )


# hidden truth of 40 clients: the first 20 have high loss, the even ones are fast
LOSS = np.where(np.arange(40) < 20, 3.0, 0.3)
DURATION = np.where(np.arange(40) % 2 == 0, 1.0, 10.0)


def run(selector, rounds, k=4, population=40, available=None):
    picks = []
    for rnd in range(rounds):
        chosen = selector.select(population, k, rnd, seed=7, available=available)
        assert len(set(chosen.tolist())) == k
        picks.append(chosen)
        selector.observe(rnd, report(chosen, LOSS[chosen], DURATION[chosen]))
    return picks


def test_first_rounds_explore_and_later_rounds_prefer_high_loss_fast_clients():
    oort = OortSelector()
    picks = run(oort, 60)
    assert len(set(np.concatenate(picks[:15]).tolist())) >= 30  # exploration reaches most of the population
    late = np.concatenate(picks[30:])
    wanted = (late < 20) & (late % 2 == 0)  # high loss and fast: a quarter of the population
    assert wanted.mean() > 0.6


def test_selection_is_seeded_and_picks_only_checked_in_clients():
    available = np.arange(0, 40, 3)
    a = run(OortSelector(), 10, available=available)
    b = run(OortSelector(), 10, available=available)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert set(np.concatenate(a).tolist()) <= set(available.tolist())


def test_utility_is_statistical_plus_staleness_times_the_system_penalty():
    oort = OortSelector(preferred_percentile=30.0, penalty=2.0)
    oort.select(3, 3, 0, seed=0)
    oort.observe(0, report([0, 1, 2], loss=[1.0, 1.0, 1.0], duration=[1.0, 2.0, 4.0]))
    assert oort.preferred_duration() == 1.0  # the 30th percentile of [1, 2, 4]
    # equal rewards normalise to 1; round 1 has no staleness bonus (ln 1 = 0); (T / t)^2 for t > T
    assert oort.utility(np.array([0, 1, 2]), 0).tolist() == pytest.approx([1.0, 0.25, 0.0625])
    # round 5, all last seen in round 1: + sqrt(0.1 * ln 5 / 1) before the penalty
    bonus = np.sqrt(0.1 * np.log(5))
    assert oort.utility(np.array([0, 1, 2]), 4).tolist() == pytest.approx(
        [1 + bonus, (1 + bonus) / 4, (1 + bonus) / 16]
    )


def test_clients_that_delivered_nothing_get_the_round_mean_and_keep_their_slowness():
    oort = OortSelector()
    oort.select(4, 4, 0, seed=0)
    oort.observe(0, report([0, 1, 2, 3], loss=[2.0, 4.0, np.nan, np.nan], duration=[1.0, 1.0, 9.0, np.nan],
                           completed=[True, True, False, False]))  # fmt: skip
    assert oort._reward.tolist() == [100.0, 200.0, 150.0, 150.0]
    assert oort._duration[:3].tolist() == [1.0, 1.0, 9.0] and np.isnan(oort._duration[3])


def explored(oort, population, rewards):
    oort.select(population, population, 0, seed=0)
    oort.observe(0, report(np.arange(population), loss=rewards, duration=1.0))


def test_blacklist_leaves_out_clients_that_took_part_too_often():
    rewards = np.array([9.0] * 4 + [1.0] * 6)
    oort = OortSelector(blacklist_rounds=2, exploration=0.0, exploration_min=0.0, blacklist_max_fraction=1.0)
    explored(oort, 10, rewards)
    for rnd in (1, 2):
        oort.observe(rnd, report([0, 1, 2, 3], loss=9.0, duration=1.0))  # now 3 times each: blacklisted
    chosen = oort.select(10, 4, 3, seed=0)
    assert not set(chosen.tolist()) & {0, 1, 2, 3}
    capped = OortSelector(blacklist_rounds=2, exploration=0.0, exploration_min=0.0, blacklist_max_fraction=0.2)
    explored(capped, 10, rewards)
    for rnd in (1, 2):
        capped.observe(rnd, report([0, 1, 2, 3], loss=9.0, duration=1.0))
    allowed = capped._drop_blacklisted(np.arange(10), 4)
    assert len(allowed) == 8  # at most 20% of 10 clients are blacklisted
    never = OortSelector(exploration=0.0, exploration_min=0.0, cutoff=1.0)
    explored(never, 10, rewards)
    assert set(never.select(10, 4, 3, seed=0).tolist()) == {0, 1, 2, 3}  # without a blacklist: the best four


def test_pacer_relaxes_t_when_utility_stagnates_and_tightens_it_when_it_jumps():
    flat = OortSelector(pacer_step=2, pacer_delta=5.0, exploration=0.0, exploration_min=0.0)
    explored(flat, 10, np.ones(10))
    percentiles = []
    for rnd in range(1, 8):
        chosen = flat.select(10, 3, rnd, seed=0)
        flat.observe(rnd, report(chosen, loss=1.0, duration=1.0))
        percentiles.append(flat.preferred_percentile)
    # 1-based rounds 6 and 8 compare two windows of equal exploited utility: T's percentile +5 each (at round 4
    # the earlier window held only exploration, so there is no trend yet)
    assert percentiles == [30.0, 30.0, 30.0, 30.0, 35.0, 35.0, 40.0]

    jumpy = OortSelector(pacer_step=2, pacer_delta=5.0, exploration=0.0, exploration_min=0.0)
    explored(jumpy, 10, np.ones(10))
    for rnd in range(1, 5):
        chosen = jumpy.select(10, 3, rnd, seed=0)
        jumpy.observe(rnd, report(chosen, loss=0.01 if rnd < 3 else 100.0, duration=1.0))
    jumpy.select(10, 3, 5, seed=0)  # 1-based round 6: the exploited utility grew > 5x between windows
    assert jumpy.preferred_percentile == 25.0


def test_registered_and_validated():
    assert isinstance(build_selector("oort", penalty=1.5), OortSelector)
    with pytest.raises(Exception, match="exploration must be in"):
        build_selector("oort", exploration=2.0)


def test_registered_profiles_steer_exploration_to_fast_large_clients_and_set_t():
    # 100 unexplored clients: the first 20 are fast (1 s) and hold 50 examples, the rest take 20 s and hold 10
    fast = np.arange(100) < 20
    durations = np.where(fast, 1.0, 20.0)
    sizes = np.where(fast, 50.0, 10.0)
    oort = OortSelector(sample_window=2.0)
    oort.register(durations=durations, sizes=sizes)
    assert oort.preferred_duration() == 20.0  # the 30th percentile of the registered durations
    picked = np.concatenate([oort.select(100, 8, rnd, seed=3) for rnd in range(5)])  # nothing observed yet
    # score = size x min(1, T / d)^2: 50 for the fast ones, 10 for the rest; the window (16 best) is all fast
    assert fast[picked].all()
    blind = np.concatenate([OortSelector().select(100, 8, rnd, seed=3) for rnd in range(5)])
    assert fast[blind].mean() < 0.5  # without profiles exploration is uniform: ~20% fast


def test_register_checks_its_input_and_reports_replace_expected_durations():
    oort = OortSelector()
    with pytest.raises(ValueError, match="finite number of seconds > 0"):
        oort.register(durations=np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="one length"):
        oort.register(durations=np.ones(3), sizes=np.ones(2))
    oort.register(durations=np.array([1.0, 2.0, 3.0]))
    oort.select(3, 3, 0, seed=0)
    oort.observe(0, report([0, 1, 2], loss=1.0, duration=[5.0, 2.0, 3.0]))
    assert oort._duration.tolist() == [5.0, 2.0, 3.0]


def test_state_survives_a_checkpoint_file_and_the_next_selections_are_the_same(tmp_path):
    # 45 rounds: the pacer has moved T's percentile and the blacklist is active; registration told sizes
    make = lambda: OortSelector(pacer_step=5, blacklist_rounds=8)  # noqa: E731
    oort = make()
    oort.register(durations=DURATION * 1.5, sizes=np.arange(40) + 10)
    run(oort, 45)
    params = FlatParams.from_tensors({"w": torch.zeros(1)})
    snap = {
        "global": params,
        "state": {},
        "round": 45,
        "sim_time": 0.0,
        "seed": 0,
        "parts": {"selector": oort.state_dict()},
    }
    save_checkpoint(tmp_path / "c", snap)
    restored = make()
    restored.load_state_dict(load_checkpoint(tmp_path / "c", params, {})["parts"]["selector"])
    assert restored.preferred_percentile == oort.preferred_percentile != 30.0
    for rnd in range(45, 60):
        a, b = oort.select(40, 4, rnd, seed=7), restored.select(40, 4, rnd, seed=7)
        assert np.array_equal(a, b)
        for s in (oort, restored):
            s.observe(rnd, report(a, LOSS[a], DURATION[a]))
    fresh = make()
    fresh.register(durations=DURATION * 1.5, sizes=np.arange(40) + 10)
    assert any(not np.array_equal(fresh.select(40, 4, r, 7), oort.select(40, 4, r, 7)) for r in range(60, 63))


def test_a_checkpoint_of_another_selector_or_population_is_refused():
    oort = OortSelector()
    run(oort, 3)
    state = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in oort.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match="not oort's"):
        OortSelector().load_state_dict({**state, "kind": "uniform"})
    bigger = OortSelector()
    bigger.select(50, 4, 0, seed=7)
    with pytest.raises(CheckpointMismatchError, match="covers 40 clients, this job 50"):
        bigger.load_state_dict(state)
