"""Secure aggregation (SecAgg+, Bell et al. CCS 2020): the primitives. The party and server state machines
build on them (their API is documented here once they land)."""

from fedfleet.secagg.config import Plan, SecAggConfig
from fedfleet.secagg.errors import SecAggFailed, SecAggRefused

__all__ = ["Plan", "SecAggConfig", "SecAggFailed", "SecAggRefused"]
