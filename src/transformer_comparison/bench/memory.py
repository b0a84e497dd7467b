"""Peak memory of one call, measured the same way every time (docs/benchmarks.md says why it can be trusted).

    peak = measure_peak(fn, device, track=(q, k, v))   # PeakMemory(bytes, rss_bytes, method)

`bytes` is the highest number of bytes allocated at once during `fn()` above what was allocated
when it started (the inputs), i.e. the extra memory one execution needs.

CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before.

CPU: torch keeps no CPU allocator statistics, so `fn()` runs once under
`torch.profiler.profile(profile_memory=True)`, which makes c10's CPU allocator report every
allocation and free (size and running total) as an Allocation event; the peak is the highest
running total minus the total before the first event (method "allocator_events"). That sees every
allocation through torch's allocator, including scratch buffers a fused operator (e.g. torch's
scaled_dot_product_attention) allocates and frees internally. If those profiler internals are
unavailable it falls back to `torch.distributed._tools.mem_tracker.MemTracker` ("memtracker"),
which counts the storages operators return and so misses such internal scratch. Beside it, the peak
resident set size (RSS) over the same call is returned as a cross-check (`rss_bytes`, Linux: the
high-water mark is reset through /proc/self/clear_refs first); RSS also includes malloc's
fragmentation and freed-but-kept memory, so it is an upper bound, not the measurement.
"""

from __future__ import annotations

import re
import resource
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

METHOD_CUDA = "cuda_max_memory_allocated"
METHOD_ALLOCATOR = "allocator_events"
METHOD_MEMTRACKER = "memtracker"


@dataclass(frozen=True)
class PeakMemory:
    bytes: int
    rss_bytes: int | None
    method: str


def measure_peak(fn: Callable[[], Any], device: torch.device, track: Sequence[Tensor] = ()) -> PeakMemory:
    """Run `fn()` once and return the memory it needed above what was allocated before it.

    `track`: tensors alive before the call (its inputs); only the MemTracker fallback needs them.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return PeakMemory(int(peak), None, METHOD_CUDA)

    rss_before = _reset_rss_peak()
    try:
        peak, method = allocator_peak(fn), METHOD_ALLOCATOR
    except (ImportError, AttributeError):
        rss_before = _reset_rss_peak()
        peak, method = memtracker_peak(fn, device, track), METHOD_MEMTRACKER
    rss_peak = _proc_status_bytes("VmHWM")
    rss = None if rss_before is None or rss_peak is None else max(0, rss_peak - rss_before)
    return PeakMemory(max(0, peak), rss, method)


def allocator_peak(fn: Callable[[], Any]) -> int:
    """Peak CPU bytes allocated during `fn()` above the start, from the profiler's Allocation events."""
    from torch._C._profiler import _EventType

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            events.append(event.extra_fields)
    if not events:
        return 0
    # total_allocated: the allocator's running total after each event (allocations made while profiling)
    start = min(e.total_allocated - e.alloc_size for e in events)
    return int(max(e.total_allocated for e in events) - start)


def memtracker_peak(fn: Callable[[], Any], device: torch.device, track: Sequence[Tensor]) -> int:
    """Peak bytes of live tensor storages during `fn()` above the start (operator outputs only)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    if track:
        tracker.track_external(*track)
    with tracker:
        before = _snapshot_total(tracker.get_tracker_snapshot("current"), device)
        result = fn()
        del result
    return _snapshot_total(tracker.get_tracker_snapshot("peak"), device) - before


def _snapshot_total(snapshot: dict[torch.device, dict[Any, int]], device: torch.device) -> int:
    return next((int(values["Total"]) for dev, values in snapshot.items() if dev.type == device.type), 0)


def _proc_status_bytes(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _reset_rss_peak() -> int | None:
    """Reset the RSS high-water mark to the current RSS (Linux >= 4.0) and return it; None elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _proc_status_bytes("VmRSS")


def limit_address_space(extra_bytes: int) -> None:
    """Let this process map at most `extra_bytes` more virtual memory, so that an allocation larger than
    the machine holds fails with a catchable error instead of waking the OOM killer. Call it after
    warm-up (thread pools and libraries are mapped by then). No-op where /proc is missing."""
    vm_size = _proc_status_bytes("VmSize")
    if vm_size is None:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = vm_size + extra_bytes
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        match = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None
