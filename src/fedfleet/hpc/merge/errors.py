"""The one error of the merge: a user's checkpoint, manifest or request that cannot be merged as asked."""

from __future__ import annotations

from fedfleet.errors import UserError


class MergeError(UserError):
    """The message names the file (and the tensor) at fault; nothing is written when it is raised."""
