"""An Offsite-Tuning side's YAML, from the shipped examples with some keys changed (for the config tests)."""

from pathlib import Path

import yaml

from tests.paths import ROOT

EXAMPLES = ROOT / "examples" / "offsite"


def side(tmp_path: Path, name: str = "guest", **changes) -> Path:
    raw = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    for key, value in changes.items():
        section, _, sub = key.partition("__")
        if sub:
            raw[section] = {**raw.get(section, {}), sub: value}
        else:
            raw[section] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path
