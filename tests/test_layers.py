"""The layers of docs/architecture.md, enforced: every ``fedfleet`` import (at the top, inside a function or
under TYPE_CHECKING) must point down, or sideways along one of the sub-orders written down here."""

import ast
from pathlib import Path

from tests.paths import ROOT

SRC = ROOT / "src" / "fedfleet"

# top to bottom; a unit is a top-level package, or one runtime (runtime.sim, runtime.ray, ...)
LAYERS: list[tuple[str, set[str]]] = [
    ("edge", {"cli", "config", "jobs"}),
    ("integrations", {"hf", "lightning", "offsite", "hpc"}),
    ("sync", {"sync"}),
    ("runtime", {"runtime", "runtime.sim", "runtime.ray", "runtime.grpc", "runtime.files", "security"}),
    (
        "algorithms",
        {"strategy", "select", "client", "callbacks", "transforms", "privacy", "secagg", "robust", "attacks"},
    ),
    ("core", {"core"}),
    ("data", {"data", "models", "traces"}),
    ("base", {"errors", "registry", "lazy"}),
]

# the allowed sideways imports inside a layer, with the reason
SUB_ORDERS: dict[tuple[str, str], str] = {
    ("cli", "config"): "commands parse their job files",
    ("cli", "jobs"): "commands run the jobs they parsed",
    ("jobs", "config"): "a job is assembled from its typed config",
    ("offsite", "hf"): "Offsite-Tuning's data owners train with FedAvgClient",
    ("runtime.ray", "runtime.sim"): "Ray workers train their share with the in-process runtime",
    ("runtime.grpc", "runtime.sim"): "a deployed party's seed is the simulated client's (client_seed)",
    ("runtime.files", "runtime.sim"): "a site's seed is the simulated client's (client_seed)",
    ("runtime", "runtime.sim"): "the runtime package's doc names its runtimes",
    ("transforms", "robust"): "the robust aggregation rules are registered as fold transforms",
    ("transforms", "attacks"): "the attacker behaviours are registered as party-side transforms",
    ("models", "data"): "models are shaped by a dataset's features",
    ("registry", "errors"): "an unknown name is a ConfigError",
}

ROOT_EXEMPT = {"fedfleet"}  # the package's lazy re-exports of the public names


def unit_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "fedfleet"
    if parts[1] == "runtime" and len(parts) > 2:
        return f"runtime.{parts[2]}"
    return parts[1]


def layer_of(unit: str) -> int:
    for depth, (_, units) in enumerate(LAYERS):
        if unit in units:
            return depth
    raise AssertionError(f"{unit} has no layer in tests/test_layers.py (and docs/architecture.md)")


def module_name(path: Path, src: Path = SRC) -> str:
    parts = path.relative_to(src.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("fedfleet"):
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("fedfleet")]
    return found


def violations(src: Path = SRC) -> list[str]:
    bad = []
    for path in sorted(src.rglob("*.py")):
        source = unit_of(module_name(path, src))
        if source in ROOT_EXEMPT:
            continue
        for line, target in imports(path):
            to = unit_of(target)
            if to == source or (source, to) in SUB_ORDERS:
                continue
            if to in ROOT_EXEMPT:
                if target == "fedfleet":  # ``from fedfleet import __version__`` and the like
                    continue
                bad.append(f"{path.relative_to(src.parent)}:{line}: imports the package root {target}")
            elif layer_of(to) <= layer_of(source):
                kind = "up" if layer_of(to) < layer_of(source) else "sideways"
                bad.append(f"{path.relative_to(src.parent)}:{line}: {source} imports {target} ({kind})")
    return bad


def test_every_import_points_down_or_along_a_written_sub_order():
    assert violations() == []


def test_every_package_has_a_layer():
    units = {unit_of(module_name(p)) for p in SRC.rglob("*.py")} - ROOT_EXEMPT
    for unit in units:
        layer_of(unit)


def test_the_check_catches_upward_and_sideways_imports(tmp_path):
    """The check itself can fail: a core module importing the sync layer, a strategy importing a selector."""
    (tmp_path / "fedfleet" / "core").mkdir(parents=True)
    (tmp_path / "fedfleet" / "strategy").mkdir()
    (tmp_path / "fedfleet" / "core" / "probe.py").write_text("def f():\n    from fedfleet.sync.local import X\n")
    (tmp_path / "fedfleet" / "strategy" / "probe.py").write_text("import fedfleet.select.oort\n")
    assert violations(tmp_path / "fedfleet") == [
        "fedfleet/core/probe.py:2: core imports fedfleet.sync.local (up)",
        "fedfleet/strategy/probe.py:1: strategy imports fedfleet.select.oort (sideways)",
    ]
