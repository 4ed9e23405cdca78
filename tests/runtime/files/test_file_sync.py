"""Party-paced syncs over the folder (FileContext): each sync is a round of the FileRuntime's loop, the last one
loads the session's final params. Parties here are threads syncing plain FlatParams, each moving its params by
a step of its own, so the weighted means can be computed by hand."""

from __future__ import annotations

import threading

import pytest
import torch

from fedfleet.core.fit_config import FitConfig
from fedfleet.core.loop import LoopConfig, RoundLoop
from fedfleet.core.params import FlatParams
from fedfleet.errors import ConfigError
from fedfleet.runtime.files import FileContext, FileRuntime, GlobalMissingError
from fedfleet.select import build_selector
from fedfleet.strategy import build_strategy

NAMES = ["guest-1", "host-2"]


def flat(value: float) -> FlatParams:
    return FlatParams.from_tensors({"w": torch.full((2, 3), value), "b": torch.full((3,), value)})


def test_each_sync_is_a_round_and_the_last_loads_the_final_params(tmp_path):
    runtime = FileRuntime(tmp_path, session="s", parties=NAMES, min_parties=2, round_timeout=30, poll_s=0.05)
    loop = RoundLoop(build_strategy("fedavg"), runtime, build_selector("uniform"), flat(1.0), FitConfig(),
                     LoopConfig(rounds=2, cohort=2, seed=0, eval_every=0))  # fmt: skip
    seen: dict[str, list] = {n: [] for n in NAMES}
    steps, weights = {"guest-1": 1.0, "host-2": -2.0}, {"guest-1": 3.0, "host-2": 1.0}

    def party(name: str) -> None:
        channel = FileContext(tmp_path, name, "s", timeout=30, poll_s=0.05).channel(flat(0.0).spec, 2)
        params = channel.start(flat(0.0))
        seen[name].append(float(params.tensors()["w"][0, 0]))
        going = True
        while going:
            params.add_(flat(steps[name]))  # "training"
            going = channel.sync(params, weights[name])
            seen[name].append((going, float(params.tensors()["w"][0, 0])))

    threads = [threading.Thread(target=party, args=(n,)) for n in NAMES]
    for t in threads:
        t.start()
    loop.run()
    runtime.publish_final(loop.global_params)
    for t in threads:
        t.join(30)
    mean_step = (3.0 * 1.0 + 1.0 * -2.0) / 4.0  # 0.25
    for name in NAMES:
        assert seen[name] == [1.0, (True, 1.0 + mean_step), (False, 1.0 + 2 * mean_step)]
    assert torch.equal(loop.global_params.tensors()["b"], torch.full((3,), 1.5))


def test_a_secure_session_and_a_missing_arbiter_are_told(tmp_path):
    with pytest.raises(ConfigError, match="secure aggregation needs the gRPC runtime"):
        FileContext(tmp_path, "guest-1", "s").channel(flat(0.0).spec, 2, secure=True)
    channel = FileContext(tmp_path, "guest-1", "s", timeout=0.3, poll_s=0.05).channel(flat(0.0).spec, 2)
    with pytest.raises(GlobalMissingError, match=r"round 1's global params did not verify within 0\.3 s"):
        channel.start(flat(0.0))
