"""Federated fine-tuning around the Hugging Face Trainer (FATE-LLM-style FedAvg client and server)."""
