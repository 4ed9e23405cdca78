"""How a stack of ``n`` decoder blocks is cut: bottom adapter, emulator (a uniform-stride subset of the middle), top
adapter. Pure index arithmetic, no torch.

Main model blocks ``[0, b)`` are the bottom adapter, ``[n - t, n)`` the top adapter, and the ``n - b - t`` middle
blocks are compressed to ``e`` of them, evenly spread and always including the first and last middle block
(the paper's "uniform layer drop"). The sub model is the stack ``b + e + t`` of those blocks, in order.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedfleet.errors import ConfigError

SECTIONS = ("adapter_bottom", "emulator", "adapter_top")
ADAPTERS = ("adapter_bottom", "adapter_top")


def uniform_stride(middle: int, keep: int) -> tuple[int, ...]:
    """``keep`` of ``range(middle)`` spread evenly, ends included. ``keep == 1`` takes the centre block: the
    stride formula ``(middle - 1) / (keep - 1)`` (the reference code's, and FATE-LLM's) divides by zero there."""
    if not 1 <= keep <= middle:
        raise ConfigError(f"emulator_layer_num={keep}: must be between 1 and the {middle} middle blocks")
    if keep == 1:
        return ((middle - 1) // 2,)
    stride = (middle - 1) / (keep - 1)  # >= 1, so consecutive picks never round to the same block
    return tuple(round(i * stride) for i in range(keep))


@dataclass(frozen=True)
class OffsitePlan:
    """FATE-LLM's three numbers. ``emulator_layer_num`` counts blocks kept from the middle (1 .. all of it)."""

    emulator_layer_num: int
    adapter_top_layer_num: int = 2
    adapter_bottom_layer_num: int = 2

    def __post_init__(self) -> None:
        for key in ("emulator_layer_num", "adapter_top_layer_num", "adapter_bottom_layer_num"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{key} must be a non-negative integer, got {value!r}")
        if self.emulator_layer_num < 1:
            raise ConfigError("emulator_layer_num must be at least 1 (the emulator stands in for the middle blocks)")
        if self.adapter_top_layer_num + self.adapter_bottom_layer_num < 1:
            raise ConfigError("adapter_top_layer_num + adapter_bottom_layer_num must be at least 1: nothing to tune")

    @property
    def sub_layers(self) -> int:
        return self.adapter_bottom_layer_num + self.emulator_layer_num + self.adapter_top_layer_num

    def middle(self, n_layers: int) -> int:
        middle = n_layers - self.adapter_bottom_layer_num - self.adapter_top_layer_num
        if middle < 1:
            raise ConfigError(
                f"the model has {n_layers} blocks: too few for {self.adapter_bottom_layer_num} bottom + "
                f"{self.adapter_top_layer_num} top adapter blocks and an emulator of at least one middle block"
            )
        return middle

    def emulator_layers(self, n_layers: int) -> tuple[int, ...]:
        """Main-model indices of the blocks the emulator is made of."""
        b = self.adapter_bottom_layer_num
        return tuple(b + i for i in uniform_stride(self.middle(n_layers), self.emulator_layer_num))

    def section_layers(self, n_layers: int) -> dict[str, tuple[int, ...]]:
        """Main-model block indices of each section, in sub-model order."""
        b, t = self.adapter_bottom_layer_num, self.adapter_top_layer_num
        return {
            "adapter_bottom": tuple(range(b)),
            "emulator": self.emulator_layers(n_layers),
            "adapter_top": tuple(range(n_layers - t, n_layers)),
        }

    def main_layers(self, n_layers: int) -> tuple[int, ...]:
        """Sub-model block ``i`` is main-model block ``main_layers(n)[i]``."""
        return tuple(i for section in self.section_layers(n_layers).values() for i in section)

    def sub_section_layers(self) -> dict[str, tuple[int, ...]]:
        b, e = self.adapter_bottom_layer_num, self.emulator_layer_num
        return {
            "adapter_bottom": tuple(range(b)),
            "emulator": tuple(range(b, b + e)),
            "adapter_top": tuple(range(b + e, self.sub_layers)),
        }
