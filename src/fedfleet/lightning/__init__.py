"""Federated training around PyTorch Lightning: add one callback to an existing ``L.Trainer``.

Data owners (guest, host)::

    ctx = create_context(("guest", "9999"), parties, session_id="s1", arbiter_address="arbiter:50051")
    trainer = L.Trainer(max_epochs=3, callbacks=[FedLightningCallback(ctx, FedArguments("epoch", 1))])
    trainer.fit(module, datamodule)

Arbiter (no model, no data): ``FedAvgServer(create_context(("arbiter", "10000"), parties, "s1")).train()``.
Contexts, ``FedArguments`` and the arbiter are ``fedfleet.sync``'s (``fedfleet.hf`` re-exports them too):
a Lightning party and a Hugging Face party can even share one session, as long as they train the same
parameters.
"""

from fedfleet.lightning.callback import FedLightningCallback
from fedfleet.lightning.records import SyncRecord
from fedfleet.sync import Context, FedArguments, FedAvgServer, LocalFederation, create_context

__all__ = [
    "Context",
    "FedArguments",
    "FedAvgServer",
    "FedLightningCallback",
    "LocalFederation",
    "SyncRecord",
    "create_context",
]
