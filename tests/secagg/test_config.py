"""Config validation: each bad value is one ConfigError naming the key and its bound."""

import pytest

from fedfleet.errors import ConfigError
from fedfleet.secagg import SecAggConfig


def test_defaults_give_the_complete_graph_a_majority_threshold_and_a_32_bit_ring():
    plan = SecAggConfig().validate(10)
    assert (plan.degree, plan.threshold, plan.ring_bits, plan.dtype.name) == (9, 5, 32, "uint32")
    assert plan.n * plan.weight_levels < 2**32


def test_a_fractional_threshold_means_more_than_that_share_of_the_neighbours():
    assert SecAggConfig(neighbours=8, threshold=0.5).validate(100).threshold == 5
    assert SecAggConfig(neighbours=9, threshold=0.5).validate(100).threshold == 5
    assert SecAggConfig(neighbours=8, threshold=0.75).validate(100).threshold == 7
    assert SecAggConfig(neighbours=8, threshold=1.0).validate(100).threshold == 8


@pytest.mark.parametrize("k", [0, -1, 10, 11, True, 2.0])
def test_k_out_of_range_names_the_key_and_the_bound(k):
    with pytest.raises(ConfigError, match=r"secure_aggregation.neighbours \(k\) must be an int with 1 <= k < n = 10"):
        SecAggConfig(neighbours=k).validate(10)


def test_even_and_odd_k_are_kept_and_odd_k_on_odd_n_is_rounded_up():
    assert SecAggConfig(neighbours=4).validate(10).degree == 4
    assert SecAggConfig(neighbours=3).validate(10).degree == 3
    assert SecAggConfig(neighbours=4).validate(11).degree == 4
    assert SecAggConfig(neighbours=3).validate(11).degree == 4
    assert SecAggConfig(neighbours=9).validate(10).degree == 9


@pytest.mark.parametrize("t", [4, 9, 0])
def test_t_out_of_range_names_the_majority_bound(t):
    with pytest.raises(ConfigError, match=r"threshold \(t\) must satisfy k/2 < t <= k, i.e. 5 <= t <= 8, for k = 8"):
        SecAggConfig(neighbours=8, threshold=t).validate(20)


def test_a_fraction_below_one_half_is_refused():
    with pytest.raises(ConfigError, match=r"threshold as a fraction must be in \[0.5, 1\]"):
        SecAggConfig(threshold=0.3).validate(20)


def test_a_ring_that_n_parties_overflow_is_refused_with_the_bound():
    assert SecAggConfig(bits=16).validate(65537).ring_bits == 32
    assert SecAggConfig(bits=16, neighbours=10).validate(65538).ring_bits == 64
    with pytest.raises(ConfigError, match=r"bits = 48 overflows the 64-bit ring for n = 100000 parties: .*bits <= 47"):
        SecAggConfig(bits=48, neighbours=10).validate(100_000)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("bits", 0, "bits must be an int in 1..48"),
        ("bits", 49, "bits must be an int in 1..48"),
        ("clip", 0.0, "clip must be a finite number > 0"),
        ("clip", float("inf"), "clip must be a finite number > 0"),
        ("max_weight", -1.0, "max_weight must be a finite number > 0"),
    ],
)
def test_bad_clip_bits_and_max_weight(key, value, message):
    with pytest.raises(ConfigError, match=message):
        SecAggConfig(**{key: value}).validate(10)


def test_one_party_is_refused():
    with pytest.raises(ConfigError, match="at least 2 parties"):
        SecAggConfig().validate(1)


def test_fewer_advertisers_shrink_the_graph_and_keep_a_majority():
    plan = SecAggConfig(neighbours=4, threshold=3).validate(10)
    assert plan.neighbourhood(10) == (4, 3)
    assert plan.neighbourhood(5) == (4, 3)
    assert plan.neighbourhood(4) == (3, 3)  # complete graph of 4
    assert plan.neighbourhood(3)[1] > plan.neighbourhood(3)[0]  # too few: the round fails
    odd = SecAggConfig(neighbours=3, threshold=2).validate(10)
    assert odd.neighbourhood(9) == (4, 3)  # 9 * 3 is odd: degree 4, and 2 would not be a majority of 4


def test_parsing_the_config_does_not_load_torch_and_every_public_name_resolves():
    import subprocess
    import sys

    import fedfleet.secagg as secagg

    code = "\n".join(
        [
            "import sys",
            "from fedfleet.secagg import SecAggConfig",
            "SecAggConfig().validate(3)",
            "print('torch' in sys.modules)",
        ]
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    assert sorted(secagg.__all__) == sorted(secagg._LAZY)
    assert all(getattr(secagg, name) is not None for name in secagg.__all__)


def test_the_settings_block_of_docs_secure_aggregation_is_a_valid_job_section_with_the_defaults_it_names():
    import re

    import yaml

    from fedfleet.config.loader import parse
    from tests.paths import ROOT

    doc = (ROOT / "docs" / "secure-aggregation.md").read_text()
    block = re.search(r"```yaml\n(secure_aggregation:.*?)```", doc, re.S).group(1)
    section = parse(SecAggConfig, yaml.safe_load(block)["secure_aggregation"], "secure_aggregation")
    assert section == SecAggConfig(neighbours=8)  # every other key as the doc shows it: the default
