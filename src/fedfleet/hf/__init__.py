"""Federated fine-tuning around the Hugging Face Trainer (FATE-LLM-style FedAvg client and server).

``FedAvgClient`` is a ``transformers.Trainer`` that syncs its trainable params with the other parties
(every epoch, every N steps, or a fraction of the run); ``FedAvgServer`` is the arbiter, which needs no
model. Contexts come from ``create_context`` (gRPC, mutual TLS) or ``LocalFederation`` (in-process).

``FedAvgClient`` is imported on first use: contexts, arguments and the arbiter do not need transformers
(a Lightning party or an arbiter starts seconds faster without it).
"""

from typing import Any

from fedfleet.sync import Context, FedArguments, FedAvgServer, LocalFederation, create_context

# FATE-LLM's spellings of the same classes, so its tutorials run with only their imports changed
FedAVGServer = FedAvgServer
FedAVGArguments = FedArguments

__all__ = [
    "Context",
    "FedAVGArguments",
    "FedAVGClient",
    "FedAVGServer",
    "FedArguments",
    "FedAvgClient",
    "FedAvgServer",
    "LocalFederation",
    "create_context",
]


def __getattr__(name: str) -> Any:
    if name in ("FedAvgClient", "FedAVGClient"):
        from fedfleet.hf.trainer import FedAvgClient

        return FedAvgClient
    raise AttributeError(f"module 'fedfleet.hf' has no attribute {name!r}")
