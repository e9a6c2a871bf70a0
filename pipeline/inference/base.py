"""The runtime interface (``InferenceRuntime``, ``Session``) and the runtime-neutral helpers built on it:
batched prediction, accuracy passes and timing loops."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import numpy as np

OPT_LEVELS = ("disable", "basic", "extended", "all")  # graph optimisation levels every runtime maps onto its own


class Session(ABC):
    """One loaded model on one runtime: single input (images), single output (logits)."""

    runtime: str  # name of the runtime that made it
    input_dtype: str  # "float32" (normalised NCHW) or "uint8" (NHWC pixels, preprocessing inside the model)
    input_shape: list  # with symbolic (str) or None entries for dynamic dimensions
    output_shape: list
    metadata: dict[str, str]  # the model file's metadata_props
    devices: list[str]  # where it runs, most preferred first (ONNX Runtime: its execution providers)

    @abstractmethod
    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits of one batch."""

    @abstractmethod
    def bound_call(self, x: np.ndarray) -> Callable[[], None]:
        """One inference on the fixed input ``x`` as a serving loop calls it, for timing (the input and output
        stay on the device where the runtime allows it, so host-device copies are not timed)."""

    supports_async: bool = False

    def run_async(self, x: np.ndarray, callback: Callable[[str | None], None]) -> None:
        """Start one inference; ``callback(error or None)`` runs when it is done (runtimes with async calls)."""
        raise NotImplementedError(f"{self.runtime} has no asynchronous calls")


class InferenceRuntime(ABC):
    """What the pipeline needs of a runtime: sessions, which layers run on INT8 kernels, its environment."""

    name: str

    @abstractmethod
    def devices(self, choice: str) -> tuple[list[str], str]:
        """The devices for ``validate.provider`` (auto | cpu | cuda) and a note for the report (or "").
        A device that cannot be had is a one-line ``PipelineError`` saying what to install."""

    @abstractmethod
    def session(self, path: Path | str, threads: int = 0, opt_level: str = "all", devices: list[str] | None = None,
                optimized_path: Path | None = None, options: dict[str, str] | None = None) -> Session:
        """Load ``path``: ``threads`` intra-op threads (0: the runtime's default), graph optimisation level
        (one of ``OPT_LEVELS``); ``optimized_path``: also save the optimised graph there."""

    @abstractmethod
    def kernel_coverage(self, path: Path) -> dict:
        """Convs/matmuls on INT8 kernels in the runtime's optimised graph (``int8_kernels``, ``float_kernels``,
        ``coverage``, ``int8_ops``, ``float_ops``, ``qdq_left``, ``dequantized_ops``)."""

    @abstractmethod
    def version(self) -> str:
        """The runtime's version (for reports and model cards)."""

    def float_precisions(self) -> list[str]:
        """The float precisions a model can be compiled in on this machine, the runtime's plain one first (a
        report row each for FP32 models)."""
        return ["f32"]

    def precision_options(self, precision: str) -> dict[str, str]:
        """The ``session(options=...)`` that run a model in ``precision`` (one of ``float_precisions``)."""
        return {}


def predict(sess: Session, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits of ``x`` in batches."""
    return np.concatenate([sess.run(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def predict_images(sessions: dict[str, Session], images, mean: list[float], std: list[float],
                   batch_size: int = 256) -> dict[str, np.ndarray]:
    """Logits of every session on uint8 images (a tensor or a store view), in one pass over the images:
    each batch is read and normalised once for all sessions (bounded memory)."""
    from pipeline.onnxio import normalise

    outs: dict[str, list[np.ndarray]] = {name: [] for name in sessions}
    for i in range(0, len(images), batch_size):
        x = normalise(images[i : i + batch_size], mean, std)
        for name, sess in sessions.items():
            outs[name].append(predict(sess, x, batch_size))
    return {name: np.concatenate(o) for name, o in outs.items()}


def time_runs(sess: Session, x: np.ndarray, warmup: int, runs: int) -> np.ndarray:
    """Seconds per call on the fixed input ``x`` (a bare loop: nothing else is timed), after ``warmup`` calls."""
    call = sess.bound_call(np.ascontiguousarray(x))
    for _ in range(warmup):
        call()
    times = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        call()
        times[i] = time.perf_counter() - t0
    return times


def runs_for(sess: Session, x: np.ndarray, seconds: float, least: int = 3, most: int = 2000) -> int:
    """Timed runs of ``sess`` on ``x`` that take about ``seconds`` (at least ``least``): fast models need
    hundreds of calls per timed block, or one scheduler hiccup decides a ratio."""
    once = float(np.median(time_runs(sess, x, 1, 2)))
    return max(least, min(most, int(seconds / max(once, 1e-6))))


def startup_seconds(rt: InferenceRuntime, path: Path, devices: list[str], repeats: int = 3,
                    opt_level: str = "all") -> float:
    """Median time to load ``path`` into a session (graph optimisation included)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        rt.session(path, 0, opt_level, devices)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))

