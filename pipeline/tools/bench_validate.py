"""Benchmark: the validate stage's throughput measurement vs a bare ``InferenceSession`` loop.

    python -m pipeline.tools.bench_validate --onnx outputs/artifacts/export/train/<key>/model.onnx

Both use one session with the same options and the same batch; rounds are interleaved and the
median ratio (validate / bare) is printed; the target is within 10% (>= 0.90).
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import numpy as np

from pipeline import inference, report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    sess = inference.get().session(args.onnx, args.threads, "all")
    x = np.random.default_rng(0).standard_normal((args.batch, 3, 32, 32)).astype(np.float32)
    cfg = SimpleNamespace(batch_size=args.batch, warmup=5, latency_runs=1, throughput_runs=args.runs, rounds=1)
    raw = sess.ort  # the bare onnxruntime.InferenceSession
    name = raw.get_inputs()[0].name
    ratios = []
    for r in range(args.rounds):
        for _ in range(5):
            raw.run(None, {name: x})
        t0 = time.perf_counter()
        for _ in range(args.runs):
            raw.run(None, {name: x})
        bare = args.batch * args.runs / (time.perf_counter() - t0)
        ours = report.measure({"m": sess}, x, cfg)["m"]["throughput_ips"]
        ratios.append(ours / bare)
        print(f"round {r + 1}: validate {ours:.0f} img/s, bare loop {bare:.0f} img/s, ratio {ratios[-1]:.3f}")
    print(f"median ratio validate/bare over {args.rounds} rounds: {statistics.median(ratios):.3f} (target >= 0.90)")


if __name__ == "__main__":
    main()
