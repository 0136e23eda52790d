"""Timing helpers shared by the decode-kernel benchmarks (bench_kernels.py, bench_mustafar.py).

`time_jax` chains `reps` calls inside one jitted executable (call i + 1 takes its query through
an optimization barrier with call i's output, so XLA cannot merge the calls into one pass over
K/V); each timed run dispatches that executable `dispatches` times asynchronously and waits once,
so the host's dispatch and wait overlap the device work instead of adding to it (the figure is
device time per call, as a decode loop inside a jitted program sees it: kernel time plus the
launch gaps between the calls' kernels); it reports the median over `runs` such runs divided by
dispatches x reps. `time_torch` does the same
with all calls captured in one CUDA graph; `copy_bandwidth` is the device-to-device copy
bandwidth (torch `copy_` with CUDA, bytes read + written per second), the bound every row is
held to.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np


def make_log(lines: list[str], errors: list[dict] | None = None
             ) -> tuple[Callable[..., None], Callable[..., Any]]:
    """(log, attempt) writing to `lines`: log(*parts) prints a line and keeps it;
    attempt(name, fn, *args, **kwargs) returns fn(...) or, when it raises, logs a one-line
    FAILED message and returns None (one failing baseline must not stop a run). The traceback
    goes to `errors` as {name, error, trace} when given, else into `lines`."""

    def log(*parts: Any) -> None:
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        lines.append(line)

    def attempt(name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a failing baseline must not stop the run
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            log(f"  [{name}] FAILED {msg}")
            if errors is None:
                lines.append(traceback.format_exc())
            else:
                errors.append({"name": name, "error": msg, "trace": traceback.format_exc()})
            return None

    return log, attempt


def time_jax(fn: Callable[..., Any], qs: Any, sets: Sequence[tuple], reps: int | None = None,
             runs: int = 7, min_seconds: float = 20e-3) -> float:
    """Median seconds per call of fn(qs[i], *sets[i % len(sets)]) over `reps` chained calls
    (default len(qs)) inside one executable; qs is [reps, ...] (or longer).

    Each run dispatches the executable back to back (asynchronously) until >= `min_seconds` of
    device work is queued, then waits once: the host's per-execution dispatch and wait, ~0.1 ms,
    would otherwise be charged to the calls (it was 30 us per call for a 60 us block-sparse call
    in the runs of 2026-11-23, measured against Nsight Compute's kernel durations)."""
    reps = int(qs.shape[0] if reps is None else reps)
    nset = len(sets)

    @jax.jit
    def many(qs, sets):
        outs = []
        for i in range(reps):
            q = qs[i]
            if outs:  # call i waits for call i - 1: no merging of calls over one K/V
                q, _ = jax.lax.optimization_barrier((q, outs[-1]))
            outs.append(fn(q, *sets[i % nset]))
        return outs

    jax.block_until_ready(many(qs, sets))
    t0 = time.perf_counter()
    jax.block_until_ready(many(qs, sets))
    once = time.perf_counter() - t0  # an upper bound of one execution's device time
    dispatches = int(min(200, max(2, np.ceil(min_seconds / max(once, 1e-6)))))
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        outs = [many(qs, sets) for _ in range(dispatches)]
        jax.block_until_ready(outs)
        ts.append((time.perf_counter() - t0) / dispatches)
        del outs
    return float(np.median(ts)) / reps


def time_torch(fn: Callable[..., Any], qs: Sequence[Any], sets: Sequence[tuple],
               reps: int | None = None, runs: int = 7, chain: bool = False) -> float:
    """Median seconds per call of fn(qs[i], *sets[i % len(sets)]) over `reps` calls (default
    len(qs)), all captured in one CUDA graph (a plain host loop when CUDA is unavailable).

    chain: call i + 1 takes call i's output as its query (fn's output must have the query's
    shape, as decode attention's does), so no call can start before the previous one ends, as
    in `time_jax` and in a decoder's layer loop; without it the graph's calls are independent
    and a kernel may overlap the previous call's tail."""
    import torch

    reps = len(qs) if reps is None else int(reps)
    nset = len(sets)

    def calls() -> list[Any]:
        outs: list[Any] = []
        for i in range(reps):
            outs.append(fn(outs[-1] if chain and outs else qs[i], *sets[i % nset]))
        return outs

    if not torch.cuda.is_available():
        fn(qs[0], *sets[0])
        t0 = time.perf_counter()
        calls()
        return (time.perf_counter() - t0) / reps
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn(qs[0], *sets[0])
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = calls()
    del outs
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return float(np.median(ts)) / reps


def copy_method() -> str:
    """What `copy_bandwidth` measures on this machine: "torch" (CUDA D2D copy) or "jax"."""
    try:
        import torch
    except ImportError:
        return "jax"
    return "torch" if torch.cuda.is_available() else "jax"


def copy_bandwidth(nbytes: int, runs: int = 10) -> float:
    """Device copy bandwidth (bytes read + written per second) over a bf16 buffer of `nbytes`.

    With CUDA torch: torch `dst.copy_(src)`, median of `runs` event-timed copies (2.95-3.0 TB/s
    on an H100; the jitted `x + 1` below read 2.41 TB/s there, so it is only the fallback).
    Without: jitted `x + 1` in JAX, median of `runs` host-timed calls (a CPU smoke figure).
    """
    if copy_method() == "jax":
        return _jax_copy_bandwidth(nbytes, runs)
    import torch

    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    ts = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / float(np.median(ts))


def _jax_copy_bandwidth(nbytes: int, runs: int) -> float:
    x = jax.numpy.ones((nbytes // 2,), jax.numpy.bfloat16)
    f = jax.jit(lambda x: x + 1)
    jax.block_until_ready(f(x))
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        ts.append(time.perf_counter() - t0)
    return 2 * nbytes / float(np.median(ts))


def rel_err(a: Any, b: Any) -> float:
    """||a - b|| / ||b|| in float64 (any shapes that match)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
