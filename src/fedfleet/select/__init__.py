"""Client selectors, registered by name in ``SELECTORS``."""

from fedfleet.select import oort, uniform  # noqa: F401  (registers)
from fedfleet.select.base import SELECTORS, Selector, build_selector
from fedfleet.select.oort import OortSelector
from fedfleet.select.uniform import UniformSelector

__all__ = ["SELECTORS", "OortSelector", "Selector", "UniformSelector", "build_selector"]
