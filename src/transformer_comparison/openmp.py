"""Shorter OpenMP spin-waits, so that kernels made of many small operations survive a busy machine.

torch's CPU build runs its parallel operations on GNU OpenMP (libgomp). Between two parallel
regions a worker thread spins, by default about 300,000 iterations, before it sleeps. Beside another
CPU-bound process there are more runnable threads than cores. A spinning worker then burns the
timeslice that the thread it waits for needs, and every region can cost a scheduler timeslice. One
SDPA call is one region, but a tiled kernel issues thousands. At n = 4096, forward + backward,
2 threads, one `python -c "while True: pass"` beside it, flash took 1.7-7.6 s against SDPA's
0.39-0.51 s (4.3-16x). With GOMP_SPINCOUNT=10000 it took 1.1-1.3 s (2.4-2.7x), and local's time fell
from 441 to 131-176 ms. On a quiet machine the kernels' times did not change beyond the run-to-run noise
(three alternating runs each; docs/results.md, "Session 7"). OMP_WAIT_POLICY=PASSIVE did better
when busy (1.5x) but made flash 1.8x slower when quiet.

`tcompare` sets the variable before torch is imported, for its own process and the processes it
starts. It does nothing if the user set GOMP_SPINCOUNT or OMP_WAIT_POLICY, or if torch (and with it
libgomp, which reads the variable once when it loads) is already imported.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping

SPIN_COUNT = 10_000
USER_CHOICES = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def shorten_spin_wait(
    environ: MutableMapping[str, str] = os.environ, modules: Mapping[str, object] = sys.modules
) -> bool:
    """Set GOMP_SPINCOUNT to SPIN_COUNT unless the user chose a wait policy or torch is loaded.

    Returns True if it set the variable."""
    if "torch" in modules or any(name in environ for name in USER_CHOICES):
        return False
    environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    return True
