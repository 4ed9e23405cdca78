"""Everything the server receives (adverts, sealed shares, masked inputs) reveals no single party's update, while
the unmasked sum is exact."""

import numpy as np

from fedfleet.secagg import SecAggConfig
from fedfleet.secagg.quantize import quantize
from tests.secagg.helpers import HandRound, make_inputs, plain_total


class Recorder:
    """Wraps the server's receiving methods and keeps every message it was handed."""

    def __init__(self, server):
        self.adverts, self.shares, self.masked = [], [], {}
        for name, keep in (
            ("receive_advert", self.adverts.append),
            ("receive_shares", lambda party, shares: self.shares.extend(shares)),
            ("receive_masked_input", lambda m: self.masked.__setitem__(m.party, m)),
        ):
            real = getattr(server, name)

            def spy(*args, _real=real, _keep=keep):
                _keep(*args)
                return _real(*args)

            setattr(server, name, spy)

    def bytes_seen(self) -> int:
        keys = sum(len(a.cipher_pk) + len(a.mask_pk) for a in self.adverts)
        return keys + sum(len(s.ciphertext) for s in self.shares) + sum(m.data.nbytes for m in self.masked.values())


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64), b.astype(np.float64))[0, 1])


def test_no_single_update_can_be_read_from_what_the_server_received():
    m = 20_000
    inputs, weights = make_inputs(10, m, seed=21)
    ramp = np.linspace(-1, 1, m, dtype=np.float32)
    inputs = {i: v * 0.2 + ramp for i, v in inputs.items()}  # a strongly structured update
    weights = dict.fromkeys(inputs, 1000.0)  # f = 1: the quantised update uses the whole range
    config = SecAggConfig(neighbours=4)
    r = HandRound(inputs, weights, config)
    seen = Recorder(r.server)
    result = r.finish(r.to_unmask())

    assert len(seen.masked) == 10 and len(seen.shares) == 10 * 4 and seen.bytes_seen() > 10 * 4 * m
    for i, masked in seen.masked.items():
        q = quantize(inputs[i], config.clip, config.bits, np.uint32, np.random.default_rng((0, 0, i)))
        assert corr(q, ramp) > 0.95  # the update itself is plain to see...
        assert abs(corr(masked.data[:-1], q)) < 0.05  # ...under its masks it is not
        assert abs(corr(masked.data[:-1], inputs[i])) < 0.05
        assert abs(masked.data.mean() / 2**32 - 0.5) < 0.01  # uniform over the ring
    # a sum of a strict subset of masked inputs stays masked too (the self masks never cancel)
    subset = sum(seen.masked[i].data[:-1].astype(np.uint64) for i in range(1, 10)) % 2**32
    assert abs(corr(subset, ramp)) < 0.05
    for s in seen.shares:  # sealed shares are uniform bytes, no readable structure
        assert len(set(s.ciphertext)) > 64

    expected = plain_total(inputs, weights, config, set(inputs))
    assert result.total.tolist() == expected.tolist()
    assert corr(result.sum, ramp) > 0.99
