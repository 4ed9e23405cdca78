"""examples/hpc/two_facilities.py (docs/coming-from-xffl.md) runs as the docs say: two FSDP facilities of 2 ranks
on their own tokenised text, each also trained alone; training lowers each facility's held-out perplexity, and the
federated model does better than a facility's own model on the other facility's text, which that one never saw."""

import json
import subprocess
import sys

import pytest
from transformers import LlamaForCausalLM

from tests.paths import ROOT


@pytest.mark.slow
def test_the_two_facility_example_learns_and_federation_covers_the_other_text(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "hpc" / "two_facilities.py"), "--quick", "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    table = json.loads(out.stdout.strip().splitlines()[-1])["perplexity"]
    for site, row in table.items():
        assert row["alone"] < row["before"] / 5, (site, row)
        assert row["federated"] < row["before"] / 5, (site, row)
        assert row["other_text_federated"] < row["other_text_alone"], (site, row)
    # every facility's model of every session was saved as a half-precision HF checkpoint
    model = LlamaForCausalLM.from_pretrained(tmp_path / "federated" / "A-checkpoint")
    assert model.config.torch_dtype is not None and len(list((tmp_path / "A-alone").glob("A-checkpoint/*"))) >= 3
