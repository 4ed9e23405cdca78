"""The error a bad trace raises: it names the file (or generator), the client and the fix."""

from __future__ import annotations

from fedfleet.errors import DataError


class TraceError(DataError):
    """A system trace (device capacity or availability) is missing, malformed or unusable."""
