"""Party-paced federation: a party's own training loop decides when it syncs (``ctx.sync(params, weight)``).

Framework-neutral: the arguments (``FedArguments``), the contexts (``create_context`` over gRPC,
``LocalFederation`` in-process), the model-less arbiter (``FedAvgServer`` / ``SyncArbiter``), how a model's
exchanged params are read and written (``access``) and the one sync driver (``driver``) that the Hugging
Face and Lightning adapters share. Both kinds of federation run the same round loop, strategies and
aggregation as a server-driven job.
"""

from fedfleet.sync.args import FedArguments
from fedfleet.sync.context import Context, create_context
from fedfleet.sync.driver import end_process_group
from fedfleet.sync.local import LocalFederation
from fedfleet.sync.server import FedAvgServer

__all__ = ["Context", "FedArguments", "FedAvgServer", "LocalFederation", "create_context", "end_process_group"]
