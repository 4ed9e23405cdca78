"""The file runtime: rounds exchanged through a shared folder, for sites whose compute nodes have no network.

The arbiter's :class:`FileRuntime` publishes each round's global params and reads the parties' updates; a site
runs :func:`run_party_round` (or a :class:`FileParty`) per round; a party that syncs at its own points (HF,
Lightning, FSDP) takes a :class:`FileContext` where it would take ``create_context``'s. Files are safetensors
plus a JSON manifest of their SHA-256 sums and sizes, published by write + fsync + atomic rename, manifest last
(``exchange.py``).
"""

from fedfleet.runtime.files.exchange import Exchange, Refused
from fedfleet.runtime.files.party import FileParty, GlobalMissingError, run_party_round
from fedfleet.runtime.files.runtime import FileRuntime
from fedfleet.runtime.files.sync_party import FileContext

__all__ = ["Exchange", "FileContext", "FileParty", "FileRuntime", "GlobalMissingError", "Refused", "run_party_round"]
