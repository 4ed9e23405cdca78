"""Federated fine-tuning around the Hugging Face Trainer (FATE-LLM-style FedAvg client and server).

``FedAvgClient`` is a ``transformers.Trainer`` that syncs its trainable params with the other parties
(every epoch, every N steps, or a fraction of the run); ``FedAvgServer`` is the arbiter, which needs no
model. Contexts come from ``create_context`` (gRPC, mutual TLS) or ``LocalFederation`` (in-process).
"""

from fedfleet.hf.args import FedArguments
from fedfleet.hf.context import Context, LocalFederation, create_context
from fedfleet.hf.trainer import FedAvgClient, FedAvgServer

__all__ = ["Context", "FedArguments", "FedAvgClient", "FedAvgServer", "LocalFederation", "create_context"]
