"""Params that never leave a client (``client.keep_local``): personal embedding rows and the like.

FedScale's DLRM guide leaves open how to avoid shipping whole embedding tables when each client touches
a few rows. The simplest sound answer for per-user tables: do not exchange them at all. The user-id table
stays on the clients, each user's row on that user's client, and only the shared tables and MLPs travel.

In simulation one model serves every client, so the local tensors must be swapped per client. Between
fits they hold their initial (seeded) values; a fit writes the client's stored rows in first, and
afterwards keeps the rows that differ from the initial values and restores those. Storage is therefore
O(rows a client touched) per client (one row per user for a user-id table), not O(table); finding the
rows is one vectorised comparison per fit. A deployed party is one client (key ``None``): its rows simply
persist the same way.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from fedfleet.core.checkpoint import CheckpointMismatchError
from fedfleet.errors import ConfigError

Rows = dict[str, tuple[Tensor, Tensor]]  # param name -> (row indices, row values)


def match_local(named: Sequence[tuple[str, nn.Parameter]], patterns: Sequence[str]) -> list[str]:
    """Names of the params that some pattern (a regular expression, searched in the name) matches.

    A pattern that matches nothing is an error: a typo would otherwise silently exchange the table.
    """
    names = [n for n, _ in named]
    chosen: set[str] = set()
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"client.keep_local: {pattern!r} is not a regular expression ({exc})") from None
        hits = {n for n in names if regex.search(n)}
        if not hits:
            raise ConfigError(
                f"client.keep_local: {pattern!r} matches no parameter; the parameters are {', '.join(names)}"
            )
        chosen |= hits
    return [n for n in names if n in chosen]


def _rows(t: Tensor) -> Tensor:
    """A view of ``t`` as (rows, row length): a table's rows, a bias vector's elements."""
    return t.view(t.shape[0], -1) if t.dim() else t.view(1, 1)


class LocalParams:
    def __init__(self, named: Sequence[tuple[str, nn.Parameter]]) -> None:
        self.params = dict(named)
        self.initial = {n: p.detach().clone() for n, p in named}
        self.rows: dict[Hashable, Rows] = {}  # client -> its rows that differ from the initial values

    @torch.no_grad()
    def load(self, client: Hashable) -> None:
        for name, (index, values) in self.rows.get(client, {}).items():
            _rows(self.params[name].data)[index] = values

    @torch.no_grad()
    def store(self, client: Hashable) -> int:
        """Keep the client's changed rows, put the initial values back; returns the number of rows kept."""
        kept: Rows = {}
        for name, p in self.params.items():
            now, initial = _rows(p.data), _rows(self.initial[name])
            index = (now != initial).any(dim=1).nonzero().squeeze(1)
            if len(index):
                kept[name] = (index, now[index].clone())
                now[index] = initial[index]
        if kept:
            self.rows[client] = kept
        else:
            self.rows.pop(client, None)
        return sum(len(index) for index, _ in kept.values())

    @contextmanager
    def applied(self, client: Hashable | None = None) -> Iterator[None]:
        """One client's rows in place, or with ``client=None`` every client's (a personalised central model:
        each user's row is that user's own; a row several clients changed gets their mean)."""
        written = self._load_one(client) if client is not None else self._load_mean()
        try:
            yield
        finally:
            with torch.no_grad():
                for name, index in written:
                    _rows(self.params[name].data)[index] = _rows(self.initial[name])[index]

    def _load_one(self, client: Hashable) -> list[tuple[str, Tensor]]:
        self.load(client)
        return [(name, index) for name, (index, _) in self.rows.get(client, {}).items()]

    @torch.no_grad()
    def _load_mean(self) -> list[tuple[str, Tensor]]:
        written = []
        for name, p in self.params.items():
            rows = [self.rows[c][name] for c in self.rows if name in self.rows[c]]
            if not rows:
                continue
            table = _rows(p.data)
            index = torch.cat([i for i, _ in rows])
            values = torch.cat([v for _, v in rows])
            unique, slot = index.unique(return_inverse=True)
            total = torch.zeros(len(unique), table.shape[1], device=table.device, dtype=table.dtype)
            total.index_add_(0, slot, values)
            count = torch.bincount(slot, minlength=len(unique)).to(table.dtype)
            table[unique] = total / count.unsqueeze(1)
            written.append((name, unique))
        return written

    def state_dict(self) -> dict[str, Any]:
        return rows_state(self.rows)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = self.rows_from(state)

    def rows_from(self, state: dict[str, Any]) -> dict[Hashable, Rows]:
        """The rows of a :func:`rows_state`, checked against this model's local params and on their device."""
        rows: dict[Hashable, Rows] = {}
        for i, (client, name) in enumerate(state.get("entries", [])):
            param = self.params.get(name)
            values = state[f"{i}/values"]
            if param is None or values.shape[1:] != _rows(param.data).shape[1:] or values.dtype != param.dtype:
                raise CheckpointMismatchError(
                    f"the checkpoint keeps rows of {name!r} {tuple(values.shape[1:])} {values.dtype} on the clients, "
                    f"but this job keeps {', '.join(self.params) or 'nothing'} local; resume the run with the "
                    f"model and client.keep_local it started with, or start a new run (--overwrite)"
                )
            device = param.device  # JSON keeps the client key's type: an int in simulation, None in a party
            rows.setdefault(client, {})[name] = (state[f"{i}/index"].to(device), values.to(device))
        return rows

    @property
    def stored_rows(self) -> int:
        return sum(len(index) for rows in self.rows.values() for index, _ in rows.values())


def rows_state(rows: dict[Hashable, Rows]) -> dict[str, Any]:
    """Clients' kept rows as a checkpoint part: ``entries`` lists (client, param) pairs; the n-th pair's row
    indices and values are ``n/index`` and ``n/values``."""
    entries = [(client, name) for client, tables in rows.items() for name in tables]
    state: dict[str, Any] = {"entries": [[c, n] for c, n in entries]}
    for i, (client, name) in enumerate(entries):
        state[f"{i}/index"], state[f"{i}/values"] = rows[client][name]
    return state


def local_state(trainer: Any) -> dict[str, Any]:
    """A simulation runtime's checkpoint part: its trainer's clients' kept rows (none without keep_local)."""
    local = getattr(trainer, "local", None)
    return local.state_dict() if local is not None else {}


def load_local_state(trainer: Any, state: dict[str, Any]) -> None:
    local = getattr(trainer, "local", None)
    if local is not None:
        local.load_state_dict(state)
    elif state.get("entries"):
        raise CheckpointMismatchError(
            "the checkpoint holds rows the clients kept (client.keep_local) but this job keeps none; resume with "
            "the client.keep_local the run started with, or start a new run (--overwrite)"
        )
