"""``fedfleet-manifest.json``: what a party says about the checkpoint it publishes, and the merge weights from it.

    {
      "format": "fedfleet-manifest/1",
      "party": "guest-9999",              # optional, for messages
      "tokens": 1250000000,               # tokens trained on since the base (optional)
      "samples": 480000,                  # examples trained on since the base (optional)
      "sha256": {"model.safetensors": "9f2c..."},   # optional: sums of the checkpoint's files
      "merge": {...}                      # written by fedfleet merge: how an output was made
    }

When ``sha256`` is there, every file the merge reads from that checkpoint must be listed and match before any
tensor of it is read (files exchanged between sites are not trusted before their manifest verifies). A key
that is not one of these is an error that names it, as everywhere in fedfleet.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedfleet.hpc.merge.errors import MergeError

MANIFEST = "fedfleet-manifest.json"
FORMAT = "fedfleet-manifest/1"
COUNTS = ("tokens", "samples")
KEYS = ("format", "party", *COUNTS, "sha256", "merge")
CHUNK = 8 << 20  # bytes hashed per read: constant memory whatever the file's size


@dataclass(frozen=True)
class Manifest:
    party: str | None = None
    tokens: int | None = None
    samples: int | None = None
    sha256: dict[str, str] = field(default_factory=dict)
    merge: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        data: dict[str, Any] = {"format": FORMAT}
        data.update({k: getattr(self, k) for k in KEYS[1:] if getattr(self, k) not in (None, {}, [])})
        return json.dumps(data, indent=2, sort_keys=False) + "\n"


def read_manifest(folder: Path) -> Manifest | None:
    """The folder's manifest, checked key by key; None when the folder has none."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MergeError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise MergeError(f"{path}: must be a JSON object")
    for key in data:
        if key not in KEYS:
            raise MergeError(f"{path}: unknown key {key!r}; valid keys: {', '.join(KEYS)}")
    if data.get("format", FORMAT) != FORMAT:
        raise MergeError(f"{path}: format {data['format']!r} is not {FORMAT!r}")
    for key in COUNTS:
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise MergeError(f"{path}: {key} must be a whole number >= 0, got {value!r}")
    sums = data.get("sha256", {})
    if not isinstance(sums, dict) or not all(isinstance(k, str) and _is_hex(v) for k, v in sums.items()):
        raise MergeError(f"{path}: sha256 must map file names to 64-digit hex sums")
    party = data.get("party")
    if party is not None and not isinstance(party, str):
        raise MergeError(f"{path}: party must be a string, got {party!r}")
    merge = data.get("merge", {})
    if not isinstance(merge, dict):
        raise MergeError(f"{path}: merge must be a JSON object")
    return Manifest(party, data.get("tokens"), data.get("samples"), dict(sums), merge)


def write_manifest(
    folder: str | Path, *, tokens: int | None = None, samples: int | None = None, party: str | None = None
) -> Path:
    """Write ``folder``'s manifest for a party's checkpoint, with the SHA-256 of every file in the folder."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = Manifest(party, tokens, samples, {p.name: file_sha256(p) for p in files})
    path = folder / MANIFEST
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(manifest.to_json())
    tmp.replace(path)
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def verify(folder: Path, manifest: Manifest, files: list[Path]) -> None:
    """Every file the merge will read from ``folder`` is in the manifest's sums, and matches."""
    for file in files:
        rel = file.relative_to(folder).as_posix()
        if rel not in manifest.sha256:
            raise MergeError(f"{file}: not covered by {folder / MANIFEST}'s sha256 sums")
        if file_sha256(file) != manifest.sha256[rel].lower():
            raise MergeError(f"{file}: its SHA-256 does not match {folder / MANIFEST} (changed or truncated)")


def resolve_weights(
    folders: list[Path], manifests: list[Manifest | None], given: list[float] | None, by: str | None
) -> list[float]:
    """The merge weights, normalised to sum to 1: ``given`` (one per checkpoint), else each manifest's ``by``
    count (tokens if every checkpoint has them, else samples)."""
    if given is not None:
        if len(given) != len(folders):
            raise MergeError(f"{len(given)} weights given for {len(folders)} checkpoints: give one per checkpoint")
        raw, source = [float(w) for w in given], "the given weights"
    else:
        if by is None:
            by = next((k for k in COUNTS if all(m is not None and getattr(m, k) is not None for m in manifests)), None)
            if by is None:
                missing = [str(f / MANIFEST) for f, m in zip(folders, manifests, strict=True) if m is None]
                what = f"no {missing[0]}" if missing else "manifests without tokens or samples in every one"
                raise MergeError(f"no weights: {what}; give --weights, or a {MANIFEST} with tokens in each checkpoint")
        if by not in COUNTS:
            raise MergeError(f"weights by {by!r}: choose one of {', '.join(COUNTS)}")
        raw = []
        for folder, manifest in zip(folders, manifests, strict=True):
            value = None if manifest is None else getattr(manifest, by)
            if value is None:
                raise MergeError(f"{folder / MANIFEST}: no {by} count to weight this checkpoint by")
            raw.append(float(value))
        source = f"the manifests' {by}"
    for folder, w in zip(folders, raw, strict=True):
        if not math.isfinite(w) or w < 0:
            raise MergeError(f"weight {w} for {folder} ({source}): weights must be finite and >= 0")
    total = math.fsum(raw)
    if not total > 0:
        raise MergeError(f"{source} sum to {total:g}: weights must sum to a positive number")
    return [w / total for w in raw]


def _is_hex(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdefABCDEF" for c in value)
