"""Measuring on a shared CPU: interleaved repeats, medians of paired ratios, peak memory, machine facts.

Other jobs share the machine, so a configuration's time is only ever compared with a baseline timed in
the same process, alternately: repeat r runs every configuration once (order reversed on odd repeats,
so a slow drift hits both sides equally); the ratio is the median over repeats of t_config / t_baseline.
Each call is timed twice: wall-clock, and the CPU time of the calling thread (`time.thread_time`). With one
torch thread on a CPU every op runs in the calling thread, so its CPU time leaves out the time other
processes held the core: the steadier clock on a loaded machine (meaningless for asynchronous CUDA work).
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone

import torch


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """CPU model, cores (visible / usable), torch and transformers versions, threads, date, load average."""
    import transformers

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": usable, "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "loadavg": list(os.getloadavg()), "cuda": torch.cuda.is_available()}


# ----------------------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Peak resident memory added while the block runs, in MiB (`self.mib`; None where unsupported).

    Method: free what Python and glibc hold (gc, malloc_trim), reset the kernel's high-water mark
    (write 5 to /proc/self/clear_refs, Linux >= 4.0), run, then VmHWM - VmRSS(before)."""

    def __enter__(self):
        _trim()
        self.before, self.mib = _status_kib("VmRSS"), None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.ok = self.before is not None
        except OSError:
            self.ok = False
        return self

    def __exit__(self, *exc) -> None:
        peak = _status_kib("VmHWM")
        if self.ok and peak is not None:
            self.mib = max(0, peak - self.before) / 1024


# ----------------------------------------------------------------------------------------------- timing
def interleaved(steps: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                memory: bool = True) -> dict[str, dict]:
    """Run every step `warmup` times, then `repeats` rounds of one call each, alternating the order.

    Returns {name: {"times": [wall s, ...], "cpu_times": [thread CPU s, ...], "median_s", "median_cpu_s",
    "peak_mib": largest PeakRSS over the timed calls}}."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    out = {name: {"times": [], "cpu_times": [], "peak_mib": None} for name in steps}
    for r in range(repeats):
        for name in (list(steps) if r % 2 == 0 else list(reversed(steps))):
            with PeakRSS() if memory else _Null() as mem:
                start, cpu = time.perf_counter(), time.thread_time()
                steps[name]()
                out[name]["times"].append(time.perf_counter() - start)
                out[name]["cpu_times"].append(time.thread_time() - cpu)
            if memory and mem.mib is not None:
                out[name]["peak_mib"] = max(out[name]["peak_mib"] or 0.0, mem.mib)
    for rec in out.values():
        rec["median_s"] = statistics.median(rec["times"])
        rec["median_cpu_s"] = statistics.median(rec["cpu_times"])
    return out


class _Null:
    mib = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def paired_ratio(times: dict[str, dict], name: str, base: str, clock: str = "times") -> float:
    """Median over repeats of times[name][clock][r] / times[base][clock][r] (both timed in round r);
    clock "times" (wall) or "cpu_times" (the calling thread's CPU time)."""
    return statistics.median(a / b for a, b in zip(times[name][clock], times[base][clock]))


# ----------------------------------------------------------------------------------------------- profile
def _self_ms(fn: Callable[[], object]) -> dict[tuple[str, str], list[float]]:
    """{(op, shape of its first input): [self CPU ms, calls]} for one call of `fn`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return {(e.key, str(list(e.input_shapes[0])) if e.input_shapes and e.input_shapes[0] else ""):
            [e.self_cpu_time_total / 1e3, e.count] for e in prof.key_averages(group_by_input_shape=True)}


def profile_pair(base: Callable[[], object], other: Callable[[], object], rounds: int = 3, n: int = 8) -> dict:
    """`rounds` alternating calls of each under torch.profiler; self CPU ms per call averaged over rounds,
    per op and shape of its first input (so one large call tells apart from many small ones).

    Returns {"plain_total_ms", "removal_total_ms", "extra": the `n` (op, shape) pairs where `other` spends
    the most extra self time, [{"op", "shape", "base_ms", "other_ms", "extra_ms", "base_calls", "other_calls"}]}."""
    acc = {"b": {}, "o": {}}
    for _ in range(rounds):
        for side, fn in (("b", base), ("o", other)):
            for key, (ms, calls) in _self_ms(fn).items():
                rec = acc[side].setdefault(key, [0.0, 0])
                rec[0] += ms / rounds
                rec[1] = calls
    b, o = acc["b"], acc["o"]
    rows = [{"op": k[0], "shape": k[1], "base_ms": b.get(k, [0.0, 0])[0], "other_ms": o.get(k, [0.0, 0])[0],
             "base_calls": b.get(k, [0.0, 0])[1], "other_calls": o.get(k, [0.0, 0])[1]} for k in set(b) | set(o)]
    for r in rows:
        r["extra_ms"] = r["other_ms"] - r["base_ms"]
    return {"plain_total_ms": sum(v[0] for v in b.values()), "removal_total_ms": sum(v[0] for v in o.values()),
            "extra": sorted(rows, key=lambda r: -r["extra_ms"])[:n]}
