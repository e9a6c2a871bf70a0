"""Serving measurements on an inference runtime: throughput per batch size, latency under concurrent
requests (a thread pool over one session, and the runtime's asynchronous calls where it has them), and a
sweep of session settings.

Every measurement warms the session up first and is interleaved across models in rounds (on small
CPUs the previous session's spinning threads steal the cores right after a switch); medians are
reported.
"""

from __future__ import annotations

import functools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline import inference


def batch_sweep(sessions: dict, x: np.ndarray, sizes: list[int], warmup: int, runs: int,
                rounds: int) -> dict[str, dict[int, dict]]:
    """images/s and ms per call at each batch size, per model (median over rounds)."""
    times: dict[str, dict[int, list]] = {n: {b: [] for b in sizes} for n in sessions}
    for _ in range(rounds):
        for name, sess in sessions.items():
            for b in sizes:
                xb = np.ascontiguousarray(np.resize(x, (b, *x.shape[1:])))
                times[name][b].append(inference.time_runs(sess, xb, warmup, runs))
    out: dict[str, dict[int, dict]] = {}
    for name in sessions:
        out[name] = {}
        for b in sizes:
            t = float(np.median(np.concatenate(times[name][b])))
            out[name][b] = {"throughput_ips": b / t, "ms_per_call": t * 1e3}
    return out


def _threads(sess: inference.Session, x1: np.ndarray, workers: int, requests: int) -> tuple[np.ndarray, float]:
    lat = np.empty(requests)
    counter = iter(range(requests))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            sess.run(x1)
            lat[i] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        for f in [pool.submit(work) for _ in range(workers)]:
            f.result()
    return lat, time.perf_counter() - t0


def _async(sess: inference.Session, x1: np.ndarray, in_flight: int, requests: int) -> tuple[np.ndarray, float]:
    """Asynchronous calls with at most ``in_flight`` requests outstanding; latency from submit to callback."""
    lat = np.empty(requests)
    slots = threading.Semaphore(in_flight)
    done = threading.Event()
    remaining = [requests]
    lock = threading.Lock()
    errors: list[str] = []

    def callback(i: int, t0: float, err: str | None) -> None:
        lat[i] = time.perf_counter() - t0
        if err:
            errors.append(err)
        slots.release()
        with lock:
            remaining[0] -= 1
            if remaining[0] == 0:
                done.set()

    t0 = time.perf_counter()
    for i in range(requests):
        slots.acquire()
        sess.run_async(x1, functools.partial(callback, i, time.perf_counter()))
    done.wait()
    if errors:
        raise RuntimeError(f"run_async failed: {errors[0]}")
    return lat, time.perf_counter() - t0


def concurrency(sessions: dict, x: np.ndarray, levels: list[int], requests: int, warmup: int,
                rounds: int, modes: tuple[str, ...] = ("threads", "async")) -> dict[str, dict[str, dict[int, dict]]]:
    """Batch-1 requests, ``level`` at a time, over one shared session: latency p50/p99 and images/s."""
    x1 = np.ascontiguousarray(x[:1])
    modes = tuple(m for m in modes if m != "async" or all(s.supports_async for s in sessions.values()))
    per_round = max(1, requests // rounds)
    lat: dict = {n: {m: {k: [] for k in levels} for m in modes} for n in sessions}
    thr: dict = {n: {m: {k: [] for k in levels} for m in modes} for n in sessions}
    for _ in range(rounds):
        for name, sess in sessions.items():
            inference.time_runs(sess, x1, warmup, 1)  # warm up after the switch
            for mode in modes:
                run = _threads if mode == "threads" else _async
                for k in levels:
                    run(sess, x1, k, min(per_round, 2 * k))  # warm-up at this level
                    t, wall = run(sess, x1, k, per_round)
                    lat[name][mode][k].append(t)
                    thr[name][mode][k].append(per_round / wall)
    return {n: {m: {k: {"latency_ms_p50": float(np.percentile(np.concatenate(lat[n][m][k]), 50) * 1e3),
                        "latency_ms_p99": float(np.percentile(np.concatenate(lat[n][m][k]), 99) * 1e3),
                        "throughput_ips": float(np.median(thr[n][m][k]))}
                    for k in levels} for m in modes} for n in sessions}


def settings_sweep(rt: inference.InferenceRuntime, path: Path, x: np.ndarray, threads: list[int], levels: list[str],
                   providers: list[str], batch: int, warmup: int, runs: int, rounds: int,
                   options: dict[str, str] | None = None) -> list[dict]:
    """Throughput at ``batch`` and batch-1 latency for each (intra-op threads, graph optimisation) pair
    (``options``: the runtime's session options every pair shares, e.g. OpenVINO's inference precision)."""
    combos = [(t, o) for t in threads for o in levels]
    sessions = {c: rt.session(path, c[0], c[1], providers, options=options) for c in combos}
    b1 = np.ascontiguousarray(x[:1])
    bn = np.ascontiguousarray(np.resize(x, (batch, *x.shape[1:])))
    lat: dict = {c: [] for c in combos}
    thr: dict = {c: [] for c in combos}
    for _ in range(rounds):
        for c, sess in sessions.items():
            lat[c].append(inference.time_runs(sess, b1, warmup, runs))
            thr[c].append(inference.time_runs(sess, bn, warmup, runs))
    return [{"threads": t, "graph_optimization": o,
             "latency_ms_p50": float(np.median(np.concatenate(lat[(t, o)])) * 1e3),
             "throughput_ips": float(batch / np.median(np.concatenate(thr[(t, o)])))} for t, o in combos]
