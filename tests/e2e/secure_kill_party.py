"""``python secure_kill_party.py STAGE <fedfleet party arguments>``: the fedfleet party command, except that the
process SIGKILLs itself the moment the arbiter's STAGE message of the first secure round arrives, so the test
knows exactly where it dropped out (its earlier answers are in: the arbiter sends STAGE only after them).

    setup   before its advert
    roster  after its advert, before its shares
    inbox   after its shares, before its masked input
    unmask  after its masked input, before its unmask reply
"""

import os
import signal
import sys

from fedfleet.cli.main import main
from fedfleet.runtime.grpc.secure_party import SecureStages

HANDLERS = {"setup": "_setup", "roster": "_roster", "inbox": "_inbox", "unmask": "_unmask"}


def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    setattr(SecureStages, HANDLERS[sys.argv[1]], die)
    sys.exit(main(["party", *sys.argv[2:]]))
