"""The one timing loop of the benchmarks (the attention table, the latency
suite, --layers).

The rule: each call is made once untimed (the warm-up, which also estimates
its cost), then ``n`` timed times, where ``n`` is ``repeat`` when it is given
(--repeat) and otherwise as many as fit in ``TIME_BUDGET_S`` judging by the
warm-up, at least ``MIN_REPEAT`` and at most ``MAX_REPEAT``; ``cap`` lowers
that for a call known to be slow (the reference).  Calls timed together
(the latency suite's pyattn and torch) share the budget, each being called
``n`` times, in blocks of ``block`` calls whose order is reversed every round
(A B, B A, A B, ...), so that the machine's noise during the run, and the
order, hit every implementation alike.  Every call is timed on its own with
``time.perf_counter``; the median is the figure reported.

Why these numbers: 2 s buys hundreds of samples of a per-token call (enough
for a stable median and p10-p90), while a prefill of tens of ms still gets
dozens; the cap of 1000 stops sub-millisecond calls from taking the whole
budget when more samples no longer move the median; 3 is the fewest for
which a median means anything, and keeps the multi-second 16k cases short.
"""
import time
from typing import NamedTuple

import numpy as np

TIME_BUDGET_S = 2.0  # per case: what the warm-up says fits in this, ...
MIN_REPEAT = 3       # ... but at least this many timed calls ...
MAX_REPEAT = 1000    # ... and at most this many


class Timed(NamedTuple):
    """What time_calls measured, each a dict by the calls' names."""

    times: dict    # seconds of every timed call
    results: dict  # the last result
    warmup: dict   # seconds of the untimed first call


def repeat_count(warmup_s, repeat=None, cap=None):
    """How many timed calls the rule above gives after a warm-up of `warmup_s`."""
    if repeat is None:
        repeat = max(MIN_REPEAT, min(MAX_REPEAT, int(TIME_BUDGET_S / max(warmup_s, 1e-9))))
    return repeat if cap is None else min(repeat, cap)


def time_calls(calls, repeat=None, cap=None, block=1):
    """Time the zero-argument callables `calls` ({name: call}) by the rule above."""
    timed = Timed({name: [] for name in calls}, {}, {})
    for name, call in calls.items():
        t0 = time.perf_counter()
        timed.results[name] = call()
        timed.warmup[name] = time.perf_counter() - t0
    n = repeat_count(sum(timed.warmup.values()), repeat, cap)
    order, done = list(calls.items()), 0
    while done < n:
        size = min(block, n - done)
        for name, call in order:
            times = timed.times[name]
            for _ in range(size):
                t0 = time.perf_counter()
                timed.results[name] = call()
                times.append(time.perf_counter() - t0)
        done += size
        order.reverse()
    return timed


def summarize(times):
    """The figures reported of a list of call times (s), in ms."""
    ms = np.asarray(times) * 1e3
    p10, median, p90 = np.percentile(ms, [10, 50, 90])
    return {"median_ms": float(median), "min_ms": float(ms.min()),
            "p10_ms": float(p10), "p90_ms": float(p90),
            "repeat": len(times), "times_ms": ms.tolist()}
