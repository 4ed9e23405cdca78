"""``fedfleet merge``: a streaming weighted merge of Hugging Face checkpoints (docs/merge.md).

- :mod:`checkpoint` -- reading a checkpoint (one file or shards with an index) tensor by tensor;
- :mod:`manifest` -- ``fedfleet-manifest.json``: a party's token / sample counts and file sums, the weights;
- :mod:`merge` -- the merge itself: fp32 accumulation, one tensor at a time, never the whole model;
- :mod:`writer` -- shards written as they are merged, published by fsync and an atomic rename;
- :mod:`server_opt`, :mod:`adamw`, :mod:`state` -- the optional server-optimiser step on the mean delta from
  a base checkpoint, and its state kept as safetensors beside the output.
"""

from fedfleet.hpc.merge.adamw import AdamWClip
from fedfleet.hpc.merge.checkpoint import Checkpoint
from fedfleet.hpc.merge.errors import MergeError
from fedfleet.hpc.merge.manifest import MANIFEST, Manifest, read_manifest, write_manifest
from fedfleet.hpc.merge.merge import MergeResult, Progress, merge_checkpoints
from fedfleet.hpc.merge.server_opt import STATE_PREFIX, ServerOpt, build_server_opt, server_opt_names, state_file

__all__ = [
    "MANIFEST",
    "STATE_PREFIX",
    "AdamWClip",
    "Checkpoint",
    "Manifest",
    "MergeError",
    "MergeResult",
    "Progress",
    "ServerOpt",
    "build_server_opt",
    "merge_checkpoints",
    "read_manifest",
    "server_opt_names",
    "state_file",
    "write_manifest",
]
