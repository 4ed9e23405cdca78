"""Integrations for batch sites and supercomputers: what a facility's job needs around training (FSDP parties,
``fedfleet merge`` of checkpoints, ...). Each piece is a module or package of its own; this file imports none."""
