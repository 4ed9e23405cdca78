"""Errors that are the user's to fix. The CLI prints their message (no traceback) and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """Something in the user's job (config, data, model) is wrong; the message names it and the fix."""

    exit_code = 2


class ConfigError(UserError):
    """A key or value in the job configuration is wrong."""


class DataError(UserError):
    """A dataset cannot be found or read, or does not fit the model."""


class TrainingDivergedError(UserError):
    """The loss became NaN or infinite during local training."""


class RoundFailedError(UserError):
    """A round stayed incomplete (too few good updates) after every attempt: the federation cannot go on."""
