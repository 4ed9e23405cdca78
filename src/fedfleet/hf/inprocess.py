"""Hugging Face parties that share one process: what they cannot keep apart is refused, with the fix.

Three things a Trainer uses are one per process, not one per Trainer:

- accelerate's ``AcceleratorState`` / ``PartialState``: every Accelerator shares one dict, and every
  ``TrainingArguments`` resets it when it sets up its device. Parties built in threads at once race on it (an
  ``AcceleratorState`` error, "You cannot pass in a deepspeed_plugin when creating a second Accelerator", or
  DeepSpeed silently dropped: 2 of 3 runs), and parties built one after the other all run the last-built
  party's DeepSpeed plugin (measured: a ZeRO-1 party ran ZeRO-3, a batch of 8 ran as 4, a plain party ran
  under DeepSpeed; a plain party built first crashed).
- torch's random generator: models built in threads at once draw their initial weights interleaved, so a
  seeded in-process run did not repeat.
- DeepSpeed's process group (``torch.distributed``), which DeepSpeed starts from the launcher's variables.

Hence: the parties of a ``LocalFederation`` are built in one thread, then each trains in its own (gRPC contexts
in threads of one process need the same; that is not checked); a DeepSpeed party shares its process with no
other party still to train; a DeepSpeed party without a launcher gets the variables of a one-process launch;
and a plain party after a DeepSpeed one is not turned into one by what the first left in the environment.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fedfleet.errors import ConfigError
from fedfleet.hf.ds_config import reconcile
from fedfleet.sync.local import LocalContext, LocalFederation

log = logging.getLogger("fedfleet.hf")

GOING_ON = "the federation cannot go on"
LAUNCHER = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # what torchrun and the deepspeed launcher set for every rank
BUILD_IN_ONE_THREAD = (
    "build every in-process party in one thread, then call each one's train() in its own thread "
    "(clients = [make(i) for i in range(n)]; threads = [Thread(target=c.train) for c in clients])"
)

_lock = threading.Lock()
_builders: weakref.WeakKeyDictionary[LocalFederation, tuple[threading.Thread, str]] = weakref.WeakKeyDictionary()
_parties: weakref.WeakKeyDictionary[Any, tuple[str, bool]] = weakref.WeakKeyDictionary()  # built, still to train
_refused: weakref.WeakKeyDictionary[LocalFederation, str] = weakref.WeakKeyDictionary()
_claimed: weakref.WeakKeyDictionary[LocalFederation, set[str]] = weakref.WeakKeyDictionary()  # names, refused too
_news = threading.Condition(_lock)  # a claim or a refusal happened
REFUSAL_GRACE_S = 10.0  # how long a failed party waits for a refusal that its failure may be the trace of


def uses_deepspeed(args: Any) -> bool:
    """Whether ``TrainingArguments`` make a DeepSpeed run (a ``deepspeed=`` config, or ``accelerate launch``'s)."""
    return getattr(args, "deepspeed_plugin", None) is not None


def claim(party: Any, ctx: Any, args: Any) -> None:
    """Called as a party is built, before its Trainer: refuse what one process cannot hold, telling the other
    in-process parties at once, so none waits out its timeout for a party that will never come."""
    name = getattr(ctx, "name", "party")
    deepspeed = uses_deepspeed(args)
    with _lock:
        reason = _built_elsewhere(ctx, name) or _shared_with_deepspeed(name, deepspeed)
        if reason is None:
            _parties[party] = (name, deepspeed)
        if isinstance(ctx, LocalContext):
            _claimed.setdefault(ctx.federation, set()).add(name)
            if reason is not None:
                _refused.setdefault(ctx.federation, reason)
            _news.notify_all()
    if reason is not None:
        if isinstance(ctx, LocalContext):
            ctx.federation.fail(reason)
        raise ConfigError(reason)


def check_going(ctx: Any) -> None:
    """Before a party trains: another party of its federation was refused (whose TrainingArguments may already
    have reset this one's accelerate state), so say why now rather than fail on that state."""
    reason = _refused.get(ctx.federation) if isinstance(ctx, LocalContext) else None
    if reason is not None:
        raise RuntimeError(f"{GOING_ON}: {reason}")


def explain_failure(ctx: Any, exc: BaseException, grace_s: float | None = None) -> None:
    """A party's training failed. If a party of its federation is still to be built, its TrainingArguments
    may already have reset this one's accelerate state (an AttributeError on AcceleratorState) a moment before
    its own build is refused: wait briefly for that refusal and raise it as the cause, instead of the trace."""
    if not isinstance(ctx, LocalContext) or not isinstance(exc, Exception) or str(exc).startswith(GOING_ON):
        return
    federation = ctx.federation
    with _lock:
        _news.wait_for(
            lambda: federation in _refused or len(_claimed.get(federation, ())) >= federation.size,
            timeout=REFUSAL_GRACE_S if grace_s is None else grace_s,
        )
        reason = _refused.get(federation)
    if reason is not None:
        raise RuntimeError(f"{GOING_ON}: {reason}") from exc


def release(party: Any) -> None:
    """The party has trained (or failed): another may take the process's DeepSpeed state."""
    with _lock:
        _parties.pop(party, None)


def _built_elsewhere(ctx: Any, name: str) -> str | None:
    if not isinstance(ctx, LocalContext):
        return None
    here = threading.current_thread()  # the object, not its ident: a later thread may reuse a finished one's
    thread, first = _builders.setdefault(ctx.federation, (here, name))
    if thread is here:
        return None
    return (
        f"{name} is built in another thread than {first} of the same LocalFederation; {BUILD_IN_ONE_THREAD}: "
        "accelerate's AcceleratorState and torch's random generator are one per process, so parties built at "
        "once overwrite each other's (DeepSpeed dropped, AcceleratorState errors, seeded runs that do not repeat)"
    )


def _shared_with_deepspeed(name: str, deepspeed: bool) -> str | None:
    clash = [other for other, ds in _parties.values() if deepspeed or ds]
    if not clash:
        return None
    return (
        f"{name} would share this process with {', '.join(clash)}, built and not done training, and one of them "
        "uses DeepSpeed: accelerate and transformers keep one DeepSpeed configuration per process, so every party "
        "would run the last-built one's (its ZeRO stage, its batch size) or none; one DeepSpeed party per process: "
        "run each party as its own process (create_context over gRPC, on loopback with insecure=True, or the "
        "deepspeed launcher per party), or train the in-process parties without DeepSpeed"
    )


def single_process_launch(args: Any) -> None:
    """A DeepSpeed party started without a launcher: set the variables of a one-process launch. Without them
    DeepSpeed looks for MPI (and fails on a missing mpi4py). A process group, once up, stays for the process."""
    import torch.distributed as dist

    if not uses_deepspeed(args) or any(k in os.environ for k in LAUNCHER):
        return
    if dist.is_available() and dist.is_initialized():
        return
    values = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    values["MASTER_PORT"] = os.environ.get("MASTER_PORT") or str(_free_port())
    for key, value in values.items():
        os.environ.setdefault(key, value)
    log.info("DeepSpeed without a launcher: one process (RANK=0 WORLD_SIZE=1, port %s)", os.environ["MASTER_PORT"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def building(party: Any, ctx: Any, args: Any) -> Iterator[None]:
    """Around a party's ``Trainer.__init__``: claim the process (``claim``), make its DeepSpeed config agree with
    its TrainingArguments (``ds_config.reconcile``) and give DeepSpeed a one-process launch if it has none. And
    keep the environment as it was: an Accelerator with a DeepSpeed plugin sets ACCELERATE_USE_DEEPSPEED=true
    and leaves it, and the next plain Trainer of the process then ran under DeepSpeed (a launcher's own setting
    stays)."""
    claim(party, ctx, args)
    before = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    try:
        if args is not None:
            reconcile(args)
            single_process_launch(args)
        yield
    except BaseException:
        release(party)
        raise
    finally:
        if before is None:
            os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
