"""Client selectors, registered by name in ``SELECTORS``."""

from fedfleet.select import uniform  # noqa: F401  (registers)
from fedfleet.select.base import SELECTORS, Selector, build_selector
from fedfleet.select.uniform import UniformSelector

__all__ = ["SELECTORS", "Selector", "UniformSelector", "build_selector"]
