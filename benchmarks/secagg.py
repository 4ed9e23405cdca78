"""Secure aggregation (SecAgg+) costs, each beside what bounds it, in one process.

(a) Party side, one core: masking a 10M-param update with k = 8 neighbours (8 pairwise masks + 1 self mask,
    AES-128-CTR as the protocol derives its mask keys, and AES-256-CTR beside it) in GB/s of fp32 params, beside the
    raw AES-128-CTR and AES-256-CTR keystream speeds and numpy's PCG64 generator (Generator.integers, uint32)
    measured in the same run; the keystream ceiling for 9 masks is keystream / 9.
    Then the quantiser (AES-CTR draws, floor(x + u)) beside the same quantiser drawing from numpy's float64
    Generator.random (floor, fraction, compare: fedfleet's until 2026-12), the whole masked_input (quantise +
    masks + key agreements) into a new buffer and into one an earlier round wrote, the mask chunk size that
    add_masks defaults to, and the upload expansion (MaskedInput bytes / fp32 bytes).
(b) A whole round in memory (fedfleet.secagg.run_round's steps, timed per stage): 1,000 clients x 100K params,
    k = 2 log2(n) rounded, 5% of the parties dropping out, once after their masked input (the issue's case:
    their inputs count, their unmask replies are missing) and once after their shares but before their masked
    input (the costly case: the server rebuilds their mask keys and removes their pairwise masks). Server
    unmask time and whole-round time, beside a plain float64 weighted sum of the same updates.

    python benchmarks/secagg.py            # as above
    python benchmarks/secagg.py --quick    # (a) as above, (b) at 100 clients x 10K params; under 2 minutes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedfleet.secagg import SecAggConfig, SecAggParty, SecAggServer, Stage, crypto
from fedfleet.secagg import quantize as quantize_module
from fedfleet.secagg.masks import add_masks
from fedfleet.secagg.quantize import quantize

DEFAULT_QUANTISE_CHUNK = quantize_module.CHUNK


def log(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def keystream_gbps(nbytes: int, repeats: int, key_bytes: int) -> float:
    enc = Cipher(algorithms.AES(os.urandom(key_bytes)), modes.CTR(bytes(16))).encryptor()
    chunk = 1 << 20
    zeros, out = np.zeros(chunk, np.uint8), np.empty(chunk, np.uint8)

    def run() -> None:
        for _ in range(nbytes // chunk):
            enc.update_into(zeros, out)

    return (nbytes // chunk) * chunk / best(run, repeats) / 1e9


def pcg64_gbps(count: int, repeats: int) -> float:
    rng = np.random.default_rng(0)
    return count * 4 / best(lambda: rng.integers(0, 2**32, size=count, dtype=np.uint32), repeats) / 1e9


def generator_quantize(values: np.ndarray, clip: float, bits: int, rng: np.random.Generator, scale: float):
    """The alternative to quantize(): the same clipping and chunking, with stochastic rounding from numpy's
    float64 Generator.random (floor, fraction, compare), as fedfleet's quantiser drew until 2026-12."""
    flat, top = values.reshape(-1), 2**bits - 1
    mul, off = scale * top / (2.0 * clip), top / 2.0
    lo_bound, hi_bound = max(off - clip * mul, 0.0), min(off + clip * mul, float(top))
    out = np.empty(flat.size, np.uint32)
    size = DEFAULT_QUANTISE_CHUNK
    x, low, draw, up = np.empty(size), np.empty(size), np.empty(size), np.empty(size, dtype=bool)
    for lo in range(0, flat.size, size):
        n = min(size, flat.size - lo)
        xs, lows, draws, ups, outs = x[:n], low[:n], draw[:n], up[:n], out[lo : lo + n]
        np.multiply(flat[lo : lo + n], mul, out=xs, dtype=np.float64)
        xs += off
        np.clip(xs, lo_bound, hi_bound, out=xs)
        np.floor(xs, out=lows)
        xs -= lows
        rng.random(out=draws)
        np.less(draws, xs, out=ups)
        outs[...] = lows
        outs += ups
    return out


def masked_party(m: int, k: int) -> tuple[SecAggParty, list, SecAggConfig]:
    """Party 1 of a complete graph of k + 1 parties, up to its masked input: k neighbours, as in SecAgg+."""
    config = SecAggConfig(neighbours=k)
    server = SecAggServer("bench", 0, config, list(range(1, k + 2)), graph_seed=1, length=m)
    parties = {i: SecAggParty(i, "bench", 0, config, server.plan, seed=i) for i in range(1, k + 2)}
    for p in parties.values():
        server.receive_advert(p.advertise())
    for i, roster in server.rosters().items():
        server.receive_shares(i, parties[i].share_keys(roster))
    return parties[1], server.inboxes()[1], config


def party_side(m: int, k: int, repeats: int) -> dict:
    ks = keystream_gbps(m * 4, repeats, crypto.KEY_LENGTHS[crypto.PAIR_MASK])
    ks256 = keystream_gbps(m * 4, repeats, 32)
    pcg = pcg64_gbps(m, repeats)
    keys = [(os.urandom(crypto.KEY_LENGTHS[crypto.PAIR_MASK]), 1 if j % 2 else -1) for j in range(k + 1)]
    keys256 = [(os.urandom(32), sign) for _, sign in keys]
    acc = np.zeros(m, np.uint32)
    chunks = {}
    for chunk in (1 << 16, 1 << 18, 1 << 20, 1 << 22):
        chunks[chunk >> 10] = m * 4 / best(lambda c=chunk: add_masks(acc, keys, c), repeats) / 1e9
    mask_gbps = m * 4 / best(lambda: add_masks(acc, keys), repeats) / 1e9
    mask256_gbps = m * 4 / best(lambda: add_masks(acc, keys256), repeats) / 1e9
    values = (np.random.default_rng(0).standard_normal(m) * 0.3).astype(np.float32)
    rng = np.random.default_rng(1)
    quant = {}
    for chunk in (1 << 13, 1 << 15, 1 << 18):
        quantize_module.CHUNK = chunk
        quant[chunk >> 10] = m * 4 / best(lambda: quantize(values, 1.0, 16, np.uint32, rng, scale=0.5), repeats) / 1e9
    quantize_module.CHUNK = DEFAULT_QUANTISE_CHUNK
    quant_gbps = quant[DEFAULT_QUANTISE_CHUNK >> 10]
    generator_gbps = m * 4 / best(lambda: generator_quantize(values, 1.0, 16, rng, 0.5), repeats) / 1e9
    full, reused = [], []
    spare = np.zeros(m + 1, np.uint32)  # a buffer an earlier round wrote (its pages are mapped)
    for _ in range(repeats):
        party, inbox, _ = masked_party(m, k)
        t = time.perf_counter()
        masked = party.masked_input(values, 500.0, inbox)
        full.append(time.perf_counter() - t)
        party, inbox, _ = masked_party(m, k)
        t = time.perf_counter()
        party.masked_input(values, 500.0, inbox, out=spare)
        reused.append(time.perf_counter() - t)
    ceiling = ks / (k + 1)
    return {
        "params": m,
        "neighbours": k,
        "masks": k + 1,
        "mask_cipher": f"AES-{8 * crypto.KEY_LENGTHS[crypto.PAIR_MASK]}-CTR",
        "aes128_ctr_keystream_GBps": round(ks, 3),
        "aes256_ctr_keystream_GBps": round(ks256, 3),
        "pcg64_uint32_GBps": round(pcg, 3),
        "keystream_ceiling_params_GBps": round(ceiling, 3),
        "masking_params_GBps": round(mask_gbps, 3),
        "masking_vs_ceiling": round(mask_gbps / ceiling, 3),
        "masking_aes256_params_GBps": round(mask256_gbps, 3),
        "masking_aes128_vs_aes256": round(mask_gbps / mask256_gbps, 3),
        "aes_vs_pcg64": round(ks / pcg, 3),
        "chunk_KiB_to_params_GBps": {str(c): round(v, 3) for c, v in chunks.items()},
        "quantise_params_GBps": round(quant_gbps, 3),
        "quantise_chunk_Kelements_to_params_GBps": {str(c): round(v, 3) for c, v in quant.items()},
        "quantise_generator_random_params_GBps": round(generator_gbps, 3),
        "quantise_vs_generator_random": round(quant_gbps / generator_gbps, 3),
        "masked_input_s": round(min(full), 4),
        "masked_input_params_GBps": round(m * 4 / min(full) / 1e9, 3),
        "masked_input_into_a_reused_buffer_s": round(min(reused), 4),
        "fresh_vs_reused_buffer": round(min(full) / min(reused), 3),
        "upload_expansion": round(masked.data.nbytes / (m * 4), 6),
    }


def timed_round(inputs, weights, config: SecAggConfig, drop: dict[Stage, set[int]]) -> dict:
    """run_round's steps, with the parties' and the server's time apart (one process plays them all)."""
    ids = sorted(inputs)
    t_round = time.perf_counter()
    server = SecAggServer("bench", 0, config, ids, graph_seed=3, length=inputs[ids[0]].size)
    parties = {i: SecAggParty(i, "bench", 0, config, server.plan, seed=(0, 0, i)) for i in ids}
    clock = {"party_s": 0.0, "server_s": 0.0}

    def on(side: str, fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        clock[side] += time.perf_counter() - t
        return out

    for i in ids:
        if i not in drop.get(Stage.ADVERTISE, ()):
            on("server_s", server.receive_advert, on("party_s", parties[i].advertise))
    for i, roster in on("server_s", server.rosters).items():
        if i not in drop.get(Stage.SHARE, ()):
            on("server_s", server.receive_shares, i, on("party_s", parties[i].share_keys, roster))
    for i, inbox in on("server_s", server.inboxes).items():
        if i not in drop.get(Stage.MASKED_INPUT, ()):
            masked = on("party_s", parties[i].masked_input, inputs[i], weights[i], inbox)
            on("server_s", server.receive_masked_input, masked)
    t0 = time.perf_counter()
    requests = server.unmask_requests()
    t1 = time.perf_counter()
    replies = [parties[i].unmask(r) for i, r in requests.items() if i not in drop.get(Stage.UNMASK, ())]
    t2 = time.perf_counter()
    for reply in replies:
        server.receive_unmask_reply(reply)
    result = server.result()
    end = time.perf_counter()
    unmask_server = (t1 - t0) + (end - t2)
    clock["party_s"] += t2 - t1
    return {
        "dropped": sum(len(v) for v in drop.values()),
        "survivors": len(result.survivors),
        "server_unmask_s": round(unmask_server, 3),
        "server_total_s": round(clock["server_s"] + unmask_server, 3),
        "parties_total_s": round(clock["party_s"], 3),
        "parties_mean_ms": round(1000 * clock["party_s"] / len(ids), 2),
        "round_s": round(end - t_round, 3),
        "_result": result,
    }


def whole_round(n: int, m: int) -> dict:
    k = round(2 * math.log2(n))
    rng = np.random.default_rng(0)
    inputs = {i: (rng.standard_normal(m) * 0.3).astype(np.float32) for i in range(1, n + 1)}
    weights = {i: float(rng.integers(1, 1000)) for i in inputs}
    config = SecAggConfig(neighbours=k)
    plan = config.validate(n)
    gone = set(rng.choice(np.arange(1, n + 1), size=max(1, n // 20), replace=False).tolist())
    log(f"(b) round: n={n} m={m} k={k} (degree {plan.degree}, t={plan.threshold}), {len(gone)} dropouts")
    t = time.perf_counter()
    plain = sum(weights[i] * np.clip(inputs[i].astype(np.float64), -1, 1) for i in inputs if i not in gone)
    plain_s = time.perf_counter() - t  # the plaintext fold of the same (clipped) updates, for scale
    after_input = timed_round(inputs, weights, config, {Stage.UNMASK: gone})
    log("   after masked input:", {k: v for k, v in after_input.items() if k != "_result"})
    before_input = timed_round(inputs, weights, config, {Stage.MASKED_INPUT: gone})
    log("   before masked input:", {k: v for k, v in before_input.items() if k != "_result"})
    res = before_input.pop("_result")
    after_input.pop("_result")
    err = float(np.abs(res.mean() - plain / sum(weights[i] for i in inputs if i not in gone)).max())
    return {
        "clients": n,
        "params": m,
        "neighbours": plan.degree,
        "threshold": plan.threshold,
        "dropouts_after_masked_input": after_input,
        "dropouts_before_masked_input": before_input,
        "plain_weighted_sum_s": round(plain_s, 3),
        "secure_round_vs_plain_fold": round(before_input["round_s"] / plain_s, 1),
        "secure_server_vs_plain_fold": round(before_input["server_total_s"] / plain_s, 1),
        "mean_abs_err": err,
        "mean_bound": res.mean_bound(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    m_party = 10_000_000  # (a) takes seconds even at full size
    n, m = (100, 10_000) if args.quick else (1000, 100_000)
    log(f"(a) party side: {m_party} params, k = 8")
    a = party_side(m_party, 8, repeats=3)
    log("  ", a)
    b = whole_round(n, m)
    result = {
        "benchmark": "secagg",
        "quick": args.quick,
        "sizes": f"(a) {m_party} params; (b) {n} clients x {m} params"
        + (" (quick: (b) smaller than full)" * args.quick),
        "party": a,
        "round": b,
        "cpu": cpu(),
        "load_avg_1min": {"start": round(load, 2), "end": round(os.getloadavg()[0], 2)},
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
