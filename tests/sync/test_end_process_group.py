"""end_process_group: the group ended and what held it collected, whether or not a group was started."""

import gc
import weakref

import torch
import torch.distributed as dist

from fedfleet.sync import end_process_group
from tests.grpc_jobs import free_port


class HoldsGroup:
    """A reference cycle holding the group, as a device mesh and FSDP's hooks do."""

    def __init__(self) -> None:
        self.group = dist.group.WORLD
        self.me = self


def test_it_ends_a_group_and_collects_the_cycle_that_held_it():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    dist.all_reduce(torch.ones(1))
    gc.disable()  # only end_process_group's own collection may free the cycle
    try:
        held = weakref.ref(HoldsGroup())
        assert held() is not None  # the cycle outlives its last name
        end_process_group()
        assert not dist.is_initialized()
        assert held() is None
    finally:
        gc.enable()
    end_process_group()  # no group: nothing to end, no error
