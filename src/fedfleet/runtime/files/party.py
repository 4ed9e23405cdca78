"""The file runtime's party side: one round of a site's training, from the exchange folder and back into it.

``run_party_round`` is what a site's batch job runs once per round: wait for the round's global manifest, verify it
and the params it lists (the session, the arbiter, the round, every file's size and SHA-256, the layout of this
party's model), train on the task the arbiter wrote for this party (its config and seed), and publish the update
(params, then the manifest). Run again for a round it already answered from the same global, it publishes nothing
new: a batch job that is requeued does not train twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedfleet.core.fit_config import FitConfig
from fedfleet.errors import UserError
from fedfleet.runtime.files.exchange import (
    MANIFEST,
    Exchange,
    Published,
    Refused,
    poll_delays,
    publish,
    read_manifest,
    verify,
)
from fedfleet.runtime.files.runtime import ARBITER

log = logging.getLogger("fedfleet.party")


class GlobalMissingError(UserError):
    """The round's global model did not appear (or never verified) in time."""


def run_party_round(
    exchange: str | Path | Exchange,
    party: str,
    trainer: Any,
    data: Any,
    round: int,  # 1-based, as the exchange's folders count
    *,
    session: str,
    timeout: float = 3600.0,
    poll_s: float = 1.0,
    shard_bytes: int | None = None,
) -> Path | None:
    """Train ``party``'s update of round ``round`` (1-based, as the folders and logs count) and publish it (as
    safetensors shards of at most ``shard_bytes``, or one file); returns the update's manifest, or None when the
    arbiter did not select this party for the round."""
    ex = exchange if isinstance(exchange, Exchange) else Exchange(exchange)
    published = wait_for_global(ex, round, trainer.params.spec, session=session, timeout=timeout, poll_s=poll_s)
    tasks = published.manifest.get("tasks")
    if not isinstance(tasks, dict) or party not in tasks:
        log.info("%s: not selected for round %d", party, round)
        return None
    try:
        config = FitConfig(**tasks[party])
    except TypeError as exc:
        raise Refused(f"{published.path}: the task of {party} is not a training config ({exc})") from None
    global_sha = published.sha256
    folder = ex.update_dir(round, party)
    try:
        done = read_manifest(folder / MANIFEST)
    except Refused:
        done = None
    if done is not None and done.get("global_manifest_sha256") == global_sha and done.get("party") == party:
        log.info("%s: round %d already answered (%s)", party, round, folder / MANIFEST)
        return folder / MANIFEST
    update = trainer.fit(published.params, config, data)
    manifest = {
        "session": session,
        "party": party,
        "round": round,
        "kind": "update",
        "weight": float(update.weight),
        "is_delta": bool(update.is_delta),
        "metrics": {k: float(v) for k, v in update.metrics.items()},
        "stats": update.stats.to_wire(),
        "global_manifest_sha256": global_sha,
    }
    publish(folder, update.params, manifest, shard_bytes)
    log.info("%s: round %d: published the update of %g examples", party, round, update.weight)
    return folder / MANIFEST


def wait_for_global(
    exchange: Exchange, rnd: int, spec: Any, *, session: str, timeout: float, poll_s: float
) -> Published:
    """Round ``rnd``'s verified global params, once its manifest is there. A manifest that does not verify is
    looked at again until the timeout (the arbiter may be publishing the round again), then named in the error."""
    expect = {"session": session, "party": ARBITER, "round": rnd, "kind": "global"}
    found, _ = wait_for_first([(exchange.global_dir(rnd) / MANIFEST, expect)], spec, timeout=timeout, poll_s=poll_s,
                              what=f"round {rnd}'s global model")  # fmt: skip
    return found


def wait_for_first(
    looks: list[tuple[Path, dict[str, Any]]],
    spec: Any,
    *,
    timeout: float,
    poll_s: float,
    what: str,
    read: Callable[[Path, dict[str, Any], Any], Any] = verify,
) -> tuple[Any, int]:
    """The first of ``looks`` (a manifest and the fields it must have) that verifies, and its index; polled from
    quickly to every ``poll_s``, a manifest that does not verify looked at again until ``timeout``. ``read``: how a
    manifest is verified and read (``verify``: the whole params; a rank's slices: ``slices.read_slices``)."""
    deadline = time.monotonic() + timeout
    last = f"no manifest at {looks[0][0]}"
    delays = poll_delays(poll_s)
    while True:
        for index, (path, expect) in enumerate(looks):
            try:
                found = read(path, expect, spec)
            except Refused as exc:
                last = str(exc)
                continue
            if found is not None:
                return found, index
        if time.monotonic() >= deadline:
            raise GlobalMissingError(f"{what} did not verify within {timeout:g} s: {last}")
        time.sleep(min(next(delays), max(0.0, deadline - time.monotonic())))


class FileParty:
    """A party that answers rounds one after the other (a site with one long job, or a test's thread)."""

    def __init__(
        self,
        exchange: str | Path | Exchange,
        party: str,
        trainer: Any,
        data: Any,
        *,
        session: str,
        timeout: float = 3600.0,
        poll_s: float = 1.0,
        shard_bytes: int | None = None,
    ) -> None:
        self.shard_bytes = shard_bytes
        self.exchange = exchange if isinstance(exchange, Exchange) else Exchange(exchange)
        self.party, self.trainer, self.data = party, trainer, data
        self.session, self.timeout, self.poll_s = session, timeout, poll_s

    def run_round(self, rnd: int) -> Path | None:
        return run_party_round(
            self.exchange, self.party, self.trainer, self.data, rnd, session=self.session, timeout=self.timeout,
            poll_s=self.poll_s, shard_bytes=self.shard_bytes,
        )  # fmt: skip

    def run(self, last: int, first: int | None = None) -> list[Path | None]:
        """Answer rounds ``first`` to ``last``; ``first`` by default is the earliest round the folder holds (1 when
        it holds none): a party started again after older rounds were pruned does not wait for them."""
        if first is None:
            held = self.exchange.rounds()
            first = held[0] if held else 1
        return [self.run_round(rnd) for rnd in range(first, last + 1)]
