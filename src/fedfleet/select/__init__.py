"""Client selectors, registered by name in ``SELECTORS``."""

from fedfleet.select import oort, poisson, uniform  # noqa: F401  (registers)
from fedfleet.select.base import SELECTORS, Selector, build_selector
from fedfleet.select.oort import OortSelector
from fedfleet.select.poisson import PoissonSelector
from fedfleet.select.uniform import UniformSelector

__all__ = ["SELECTORS", "OortSelector", "PoissonSelector", "Selector", "UniformSelector", "build_selector"]
