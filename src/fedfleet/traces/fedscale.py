"""Loaders for FedScale's own system traces (``device_conf_file`` and ``device_avail_file``), same semantics.

``client_device_capacity``: a pickle of ``{client_id: {'computation': ms, 'communication': kbps}}``.
FedScale reads ``computation`` as the inference latency of one sample in milliseconds and charges training
3x that (backward ~ 2x forward: its ``augmentation_factor``), and ``communication`` as the bandwidth in
kbit/s for both directions, with model sizes in kbit of 1024 bits. So here:
seconds per sample = 3 * computation / 1000, bytes/s up and down = communication * 1024 / 8.

``client_behave_trace``: a pickle of ``{client_id: {'active': [...], 'inactive': [...], 'finish_time': s,
'duration': s}}``: the client is online during ``[active[j], inactive[j]]`` (seconds, closed), and the
trace repeats every ``finish_time`` seconds (FedScale checks ``t % finish_time``). ``duration`` is not used
by FedScale's availability check and is ignored here too. One difference in use: FedScale only asks whether
a client is online at the moment it would finish; fedfleet's clock asks that it stays online from the
round's start until it finishes (a session that ends mid-training loses the update).

Which trace a client gets: FedScale reuses its traces cyclically over the population (client ids modulo the
number of traces); ``assign: cycle`` does that (client i takes the file's entry i mod len, in file order).
``assign: exact`` needs an entry for every client, keyed ``first_id + i`` (FedScale numbers clients from 1).

FedScale ships its traces as pickles, and a pickle can run code when loaded: these are read with an unpickler
that admits plain data only (``traces.safe_pickle``), so a file that would run anything is refused, named.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedfleet.traces.availability import Availability
from fedfleet.traces.capacity import DeviceCapacity
from fedfleet.traces.errors import TraceError
from fedfleet.traces.safe_pickle import RefusedPickle, load_plain
from fedfleet.traces.system import SystemTraces

AUGMENTATION = 3.0  # FedScale: training a sample costs forward + backward ~ 3x the measured inference
KBPS_TO_BYTES_PER_S = 1024.0 / 8.0  # FedScale's kbit is 1024 bits (model size = bytes / 1024 * 8)

Assign = Literal["cycle", "exact"]


def load_fedscale_traces(
    num_clients: int,
    seed: int = 0,
    *,
    device_conf_file: str | None = None,
    device_avail_file: str | None = None,
    assign: Assign = "cycle",
    first_id: int = 1,
    augmentation_factor: float = AUGMENTATION,
) -> SystemTraces:
    """Both traces for ``num_clients`` (``seed`` is unused: the files decide everything)."""
    if device_conf_file is None:
        raise TraceError(
            "system.traces fedscale: device_conf_file is required (FedScale's client_device_capacity pickle, "
            "in benchmark/dataset/data/device_info/); use traces: generate for synthetic devices"
        )
    if assign not in ("cycle", "exact"):
        raise TraceError(f"system.traces fedscale: assign must be 'cycle' or 'exact', got {assign!r}")
    capacity = load_fedscale_capacity(device_conf_file, num_clients, assign, first_id, augmentation_factor)
    avail = None
    if device_avail_file is not None:
        avail = load_fedscale_availability(device_avail_file, num_clients, assign, first_id)
    return SystemTraces(capacity, avail)


def load_fedscale_capacity(
    path: str | Path,
    num_clients: int,
    assign: Assign = "cycle",
    first_id: int = 1,
    augmentation_factor: float = AUGMENTATION,
) -> DeviceCapacity:
    table = _read_pickle(path, "device_conf_file", "{client_id: {'computation': ms, 'communication': kbps}}")
    keys = list(table)
    compute = np.empty(len(keys))
    kbps = np.empty(len(keys))
    for row, key in enumerate(keys):
        compute[row] = _number(table[key], "computation", "ms per sample", path, key)
        kbps[row] = _number(table[key], "communication", "kbps", path, key)
    for values, name, positive in ((compute, "computation", False), (kbps, "communication", True)):
        bad = ~np.isfinite(values) | (values <= 0 if positive else values < 0)
        if bad.any():
            row = int(np.argmax(bad))
            raise TraceError(
                f"{path}: client {keys[row]!r} has '{name}' = {values[row]}; it must be "
                f"{'> 0' if positive else '>= 0'} (a negative or zero speed is a broken measurement): "
                f"fix or drop that entry"
            )
    rows = _assign(keys, num_clients, assign, first_id, path)
    bandwidth = kbps[rows] * KBPS_TO_BYTES_PER_S
    return DeviceCapacity(augmentation_factor * compute[rows] / 1000.0, bandwidth, bandwidth.copy())


def load_fedscale_availability(
    path: str | Path, num_clients: int, assign: Assign = "cycle", first_id: int = 1
) -> Availability:
    table = _read_pickle(path, "device_avail_file", "{client_id: {'active': [...], 'inactive': [...], ...}}")
    keys = list(table)
    sizes = np.empty(len(keys), dtype=np.int64)
    period = np.empty(len(keys))
    starts: list[Any] = []
    ends: list[Any] = []
    for row, key in enumerate(keys):
        entry = table[key]
        if not isinstance(entry, dict) or not {"active", "inactive", "finish_time"} <= set(entry):
            raise TraceError(
                f"{path}: client {key!r} is not a FedScale behaviour trace: expected a dict with 'active', "
                f"'inactive' and 'finish_time', got {_short(entry)}"
            )
        active, inactive = list(entry["active"]), list(entry["inactive"])
        if len(active) != len(inactive):
            raise TraceError(
                f"{path}: client {key!r} has {len(active)} 'active' times but {len(inactive)} 'inactive' ones; "
                f"each online interval needs both"
            )
        sizes[row] = len(active)
        period[row] = _number(entry, "finish_time", "seconds", path, key)
        starts.extend(active)
        ends.extend(inactive)
    offsets = np.zeros(len(keys) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    try:
        file_level = Availability(
            offsets, np.asarray(starts, dtype=np.float64), np.asarray(ends, dtype=np.float64), period
        )
    except (TypeError, ValueError) as exc:
        raise TraceError(f"{path}: 'active' and 'inactive' must hold numbers (seconds): {exc}") from None
    file_level.check(str(path), keys)
    rows = _assign(keys, num_clients, assign, first_id, path)
    return _take(file_level, rows).check(f"{path} (as assigned to {num_clients} clients)", _KeyOf(keys, rows))


# -- helpers ----------------------------------------------------------------------------------------
def _read_pickle(path: str | Path, what: str, shape: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise TraceError(
            f"{what} {str(path)!r} does not exist; FedScale's traces live in benchmark/dataset/data/device_info/ "
            f"(download them with FedScale's download.sh), or use traces: generate"
        )
    try:
        table = load_plain(path)  # FedScale's trace format is a pickle; plain data only (see the module note)
    except RefusedPickle as exc:
        raise TraceError(f"{what} {str(path)!r} was refused: {exc}; expected plain data {shape}") from None
    except Exception as exc:  # unpickling fails in many ways
        raise TraceError(f"{what} {str(path)!r} is not a readable pickle ({exc}); expected {shape}") from None
    if not isinstance(table, dict) or not table:
        raise TraceError(f"{what} {str(path)!r} must hold a non-empty dict {shape}, got {_short(table)}")
    return table


def _number(entry: Any, key: str, unit: str, path: str | Path, client: object) -> float:
    value = entry.get(key) if isinstance(entry, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TraceError(f"{path}: client {client!r} has no numeric {key!r} ({unit}); got {_short(entry)}")
    return float(value)


def _assign(keys: list[Any], num_clients: int, assign: Assign, first_id: int, path: str | Path) -> np.ndarray:
    """Row of the file's table that each client takes."""
    if assign == "cycle":
        return np.arange(num_clients, dtype=np.int64) % len(keys)
    row_of = {_int_key(k): row for row, k in enumerate(keys)}
    rows = np.empty(num_clients, dtype=np.int64)
    for i in range(num_clients):
        row = row_of.get(first_id + i)
        if row is None:
            raise TraceError(
                f"{path}: client {i} (FedScale id {first_id + i}) is missing: the file has {len(keys)} clients; "
                f"use assign: cycle to reuse its traces for all {num_clients} clients, or set first_id to the "
                f"file's first id"
            )
        rows[i] = row
    return rows


def _int_key(key: Any) -> Any:
    try:
        return int(key)
    except (TypeError, ValueError):
        return key


def _take(avail: Availability, rows: np.ndarray) -> Availability:
    """The availability of the file's rows ``rows`` as a new population (CSR gather, vectorised)."""
    sizes = np.diff(avail.offsets)[rows]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    within = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], sizes)
    src = np.repeat(avail.offsets[rows], sizes) + within
    return Availability(offsets, avail.starts[src], avail.ends[src], avail.period[rows])


class _KeyOf(Sequence):
    """Client index -> the FedScale id its trace came from, for error messages (no list of a million keys)."""

    def __init__(self, keys: list[Any], rows: np.ndarray) -> None:
        self.keys, self.rows = keys, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):  # type: ignore[override]
        return f"{i} (FedScale id {self.keys[int(self.rows[i])]})"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
