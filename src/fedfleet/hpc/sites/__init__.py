"""Facilities as parties: a job file's ``sites:`` (scheduler, reach, directives), the batch scripts fedfleet
writes for them, their submission and follow-up, and the runtime that submits one job per site per round."""

from fedfleet.hpc.sites.site import Site

__all__ = ["Site"]
