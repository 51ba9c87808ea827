"""What the rejection predictor reads: statistics of the drafter's next-token distribution.

Every statistic comes from the raw logits at temperature 1, whatever the sampling temperature, so
one predictor serves greedy and sampled drafting. They are computed for every drafted token, right
after the drafter's evaluation has pushed this code and its buffers out of the caches, so each numpy or
ctypes call costs 3 to 5 times its warm time: the fewer calls and buffers, the better. The package's
compiled kernel (`_kernels.c`, built at install when a C compiler is present) does it in one call: three
SIMD passes over the logits (the maximum, the runner-up, and one pass for the sums of exp(l - max),
exp(l - max) (l - max), l - max and its square), every statistic good to about 1e-6. Without it, five calls over
the 49,152 logits, into one scratch buffer reused from token to token, read the logits in place:
the argmax; the exponentials e = exp(l - max) and their sum Z (llama.cpp's SIMD `ggml_vec_soft_max_f32`,
the sum kept in float64, ~35 us; numpy's float32 exp takes ~80 us); one matrix-vector product of
[e; ones] with the logits (sum(e * l) for the entropy and sum(l) for the mean); the argmax of e with the
top zeroed (the runner-up); and the squared deviations about the mean (llama.cpp's `ggml_vec_cvar_f32`,
summed in float64, so no cancellation when the logits sit far from 0). Nothing is truncated: a
drafter's distribution can spread over most of the vocabulary (the student's median entropy is 5 nats,
with most of its logits within 20 of the maximum), so statistics over the logits near the maximum alone
would be off. All values are exact to float32 rounding except the entropy, log Z + max - sum(e * l) / Z,
whose float32 sum of e * l is good to about 1e-4 nats (the shift by the maximum it saves is one more
pass over the vocabulary). Costs per drafted token: `tools/bench_controller.py`
(docs/results/controller/bench.json).
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import sys
import threading
from functools import cache
from pathlib import Path

import numpy as np

# Per token: the distribution's shape (0-4), where the token sits in its block (5), and the
# running confidence of the block so far (6: log of the product of top-1 probabilities).
FEATURE_NAMES = ("top1_prob", "entropy", "margin", "logit_gap", "logit_std", "position", "block_log_top1")
N_FEATURES = len(FEATURE_NAMES)
MAX_LOGIT_GAP = 50.0  # masked (-inf) logits would make the gap infinite
try:  # the compiled kernels; absent when the install found no C compiler
    from wisp_edge.controller import _kernels
except ImportError:
    _kernels = None
_GGML_CPU = {"linux": "libggml-cpu.so", "darwin": "libggml-cpu.dylib", "win32": "ggml-cpu.dll"}
_F32 = np.dtype(np.float32)
_ONE_FLOAT32 = (4,)  # the strides of a contiguous float32 row
_ARGS = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float]  # (n, y, x, scalar) -> double


@cache
def ggml_kernels():
    """llama.cpp's `ggml_vec_soft_max_f32(n, y, x, max)` (y = exp(x - max), returns sum(y)) and
    `ggml_vec_cvar_f32(n, y, x, mean)` (y = x - mean, returns mean(y^2)), both summed in float64, or None
    without llama-cpp-python. Internal but exported ggml symbols: the library is loaded by path (no
    `import llama_cpp`) and used only once both agree with numpy on a test row."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "lib" / _GGML_CPU.get(sys.platform, "libggml-cpu.so")
    try:
        lib = ctypes.CDLL(str(path))
        softmax, cvar = lib.ggml_vec_soft_max_f32, lib.ggml_vec_cvar_f32
    except (OSError, AttributeError):
        return None
    for fn in (softmax, cvar):
        fn.restype, fn.argtypes = ctypes.c_double, _ARGS
    x = np.linspace(-30.0, 0.0, 37, dtype=np.float32)
    y = np.empty_like(x)
    want = np.exp(x.astype(np.float64))
    ok = math.isclose(softmax(x.shape[0], y.ctypes.data, x.ctypes.data, 0.0), want.sum(), rel_tol=1e-6)
    ok = ok and np.allclose(y, want, rtol=1e-6, atol=0.0)
    var = cvar(x.shape[0], y.ctypes.data, x.ctypes.data, -15.0)
    ok = ok and math.isclose(var, float(np.mean((x.astype(np.float64) + 15.0) ** 2)), rel_tol=1e-6)
    return (softmax, cvar) if ok else None


def ggml_softmax():
    """`ggml_vec_soft_max_f32` alone (see `ggml_kernels`), or None."""
    kernels = ggml_kernels()
    return kernels[0] if kernels else None


def _data_offset() -> int | None:
    """Where an ndarray object keeps its data pointer: numpy's `PyArrayObject_fields.data`, the first
    field after the object header. Read directly it costs a fraction of `ndarray.ctypes.data`, which
    builds a Python object per call (~20 us right after a drafter's evaluation); None if not there."""
    if sys.implementation.name != "cpython":  # id() is an object's address only in CPython
        return None
    probe, offset = np.arange(3, dtype=np.float32), object.__basicsize__
    return offset if ctypes.c_void_p.from_address(id(probe) + offset).value == probe.ctypes.data else None


_DATA_OFFSET = _data_offset()


def data_address(a: np.ndarray) -> int:
    """The address of a C-contiguous array's first element."""
    if _DATA_OFFSET is None:
        return a.ctypes.data
    return ctypes.c_void_p.from_address(id(a) + _DATA_OFFSET).value


def compiled_kernels():
    """The compiled kernels module (`stats`, `mlp3`, `LANES`), or None when the install built none."""
    return _kernels


class DistributionStats:
    """`distribution_stats` for one vocabulary size, with its buffers; one instance per thread.

    Through the compiled kernel when built (`use_compiled`), else numpy with llama.cpp's two SIMD
    kernels when llama-cpp-python is installed (`use_ggml`), else numpy alone."""

    def __init__(self, n: int, *, use_compiled: bool = True, use_ggml: bool = True) -> None:
        self.n = n
        self._compiled = _kernels.stats if use_compiled and _kernels is not None else None
        self.e_ones = np.ones((2, n), np.float32)  # [2, n]: row 0 the exponentials e (scratch), row 1 ones
        self.e = self.e_ones[0]
        self.sums = np.empty(2, np.float32)  # (sum(e * l), sum(l))
        kernels = ggml_kernels() if use_ggml else None
        self._softmax, self._cvar = kernels or (None, None)
        self._e_ptr = self.e.ctypes.data

    def __call__(self, logits: np.ndarray) -> tuple[float, float, float, float, float]:
        """logits: [n] -> (top-1 prob, entropy, top-1 minus top-2 prob, top-1 minus top-2 logit, std)."""
        if logits.dtype is not _F32 or logits.strides != _ONE_FLOAT32:  # a float32 row read in place, or a copy
            logits = np.ascontiguousarray(logits, dtype=np.float32)
        assert logits.shape == (self.n,), f"expected one row of {self.n} logits, got {logits.shape}"
        if self._compiled is not None:
            return self._compiled(data_address(logits), self.n)
        n, e = self.n, self.e
        top = int(logits.argmax())
        m = float(logits[top])
        if self._softmax is not None:
            address = data_address(logits)
            total = self._softmax(n, self._e_ptr, address, m)  # e = exp(l - m); Z = sum(e) >= 1
        else:
            np.subtract(logits, m, out=e)
            np.exp(e, out=e)
            total = float(e.sum())
        np.dot(self.e_ones, logits, out=self.sums)
        dot_el, sum_l = self.sums.tolist()
        # H = log Z - sum(e * (l - m)) / Z  (softmax entropy without materialising p, log p or l - m)
        entropy = math.log(total) + m - dot_el / total
        e[top] = 0.0
        runner_up = int(e.argmax())
        second = float(e[runner_up])  # exp(l2 - l1), 0 when it underflows (then runner_up may be any index)
        mean = sum_l / n
        if self._cvar is not None:
            var = self._cvar(n, self._e_ptr, address, mean)
        else:  # about the mean: E[l^2] - mean^2 in float32 would cancel when the logits sit far from 0
            np.subtract(logits, mean, out=e)
            var = float(np.dot(e, e)) / n
        top1 = 1.0 / total
        gap = min(m - float(logits[runner_up]), MAX_LOGIT_GAP) if second > 0.0 else MAX_LOGIT_GAP
        return top1, max(entropy, 0.0), top1 - second / total, gap, math.sqrt(max(var, 0.0))

    def top1(self, logits: np.ndarray) -> float:
        """The first statistic alone: 1 / sum(exp(l - max))."""
        if logits.dtype is not _F32 or logits.strides != _ONE_FLOAT32:
            logits = np.ascontiguousarray(logits, dtype=np.float32)
        if self._compiled is not None:
            return self._compiled(data_address(logits), self.n)[0]
        m = float(logits[int(logits.argmax())])
        if self._softmax is not None:
            return 1.0 / self._softmax(self.n, self._e_ptr, data_address(logits), m)
        np.subtract(logits, m, out=self.e)
        np.exp(self.e, out=self.e)
        return 1.0 / float(self.e.sum())


class _PerThread(threading.local):
    def __init__(self) -> None:
        self.by_size: dict[int, DistributionStats] = {}


_scratch = _PerThread()


def _stats_for(logits: np.ndarray) -> DistributionStats:
    assert logits.ndim == 1 and logits.shape[0] >= 2, f"expected one row of >= 2 logits, got {logits.shape}"
    n = logits.shape[0]
    stats = _scratch.by_size.get(n)
    if stats is None:
        stats = _scratch.by_size[n] = DistributionStats(n)
    return stats


def distribution_stats(logits: np.ndarray) -> tuple[float, float, float, float, float]:
    """logits: [vocab], finite -> (top-1 prob, entropy in nats, top-1 minus top-2 prob, top-1 minus top-2
    logit, std of the logits), all at temperature 1. The caller's row is not modified."""
    return _stats_for(logits)(logits)


class BlockFeatures:
    """Feature rows for the tokens of a draft block, in order; index 0 starts a new block.

    Holds the running product of top-1 probabilities, so feed it every token of a block.
    """

    def __init__(self) -> None:
        self._log_top1 = 0.0

    def __call__(self, index: int, logits: np.ndarray) -> np.ndarray:
        """index: the token's position in its block (from 0); logits: [vocab] -> [N_FEATURES] float32."""
        return self.from_stats(index, distribution_stats(logits))

    def from_stats(self, index: int, stats: tuple[float, float, float, float, float]) -> np.ndarray:
        """The same row from `distribution_stats` already computed (the simulator replays logged stats)."""
        top1, entropy, margin, gap, std = stats
        if index == 0:
            self._log_top1 = 0.0
        self._log_top1 += math.log(max(top1, 1e-12))
        return np.array([top1, entropy, margin, gap, std, index, self._log_top1], dtype=np.float32)


def top1_prob(logits: np.ndarray) -> float:
    """logits: [vocab] -> the largest softmax probability at temperature 1 (SLED's confidence)."""
    return _stats_for(logits).top1(logits)
