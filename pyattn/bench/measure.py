"""One case measured: every implementation and peer prepared, timed by
pyattn.bench.timing, and checked, outside the timing, against the reference."""
import contextlib
import functools
import sys
from dataclasses import asdict

import numpy as np

from pyattn.bench.cases import INTERLEAVED_CASES, LATENCY_CASES, PEER_TOLERANCE, TOLERANCE
from pyattn.bench.peers import (
    ALONGSIDE,
    BASELINE,
    F32,
    REFERENCE_MAX_REPEAT,
    SUBJECT,
    NotApplicable,
    plain_prepared,
)
from pyattn.bench.timing import summarize, time_calls

# a latency case's calls of one implementation in a row: in one process each
# library's idle OpenMP workers spin on for a while after its call, and
# blocks keep most calls clear of the other's, while still alternating often
# enough for the machine's noise to hit both
LATENCY_BLOCK = 10
# the other interleaved cases' (the bf16 suite's, calls of milliseconds and
# more): strict alternation, as the spinning workers cost little beside them
THROUGHPUT_BLOCK = 1


@contextlib.contextmanager
def _outcome_recorded(entry, name, is_peer, case):
    """Record in `entry` a case the runner declines (n/a) or, for a peer, fails
    on (error, with a warning), and go on; pyattn's or the reference's failure raises."""
    try:
        yield
    except NotApplicable as exc:
        entry.update(status="n/a", reason=str(exc))
    except Exception as exc:
        if not is_peer:
            raise
        entry.update(status="error", reason=f"{type(exc).__name__}: {exc}")
        print(f"WARNING: {name} failed on {case.name}: {entry['reason']}", file=sys.stderr)


def _bhld(out, to_bhld):
    return np.asarray(to_bhld(out) if to_bhld else out)


def _timed_entry(entry, case, times, warmup_s):
    entry.update(status="ok", **summarize(times), warmup_ms=warmup_s * 1e3)
    median_s = entry["median_ms"] / 1e3
    entry.update(gflops=case.flops / median_s / 1e9, gbps=case.nbytes / median_s / 1e9)


def _time_each(case, runners, record, q, k, v, threads, repeat, log):
    """The table's way: each runner timed alone, one after the other."""
    outputs = {}
    for name, prepared, is_peer in runners:
        if log:
            log(f"  {case.name}: {name} ...")
        entry = record["impls"][name] = {}
        cap = REFERENCE_MAX_REPEAT if name == BASELINE else None
        recorded = _outcome_recorded(entry, name, is_peer, case)
        with recorded, prepared(case, q, k, v, threads) as (call, to_bhld):
            timed = time_calls({name: call}, repeat, cap=cap)
            outputs[name] = _bhld(timed.results[name], to_bhld)
            _timed_entry(entry, case, timed.times[name], timed.warmup[name])
    return outputs


def _time_interleaved(case, runners, record, q, k, v, threads, repeat, log):
    """The latency and bf16 suites' way: every runner prepared at once and timed
    in alternating blocks; the reference only gives the result to check against."""
    outputs, calls, converters = {}, {}, {}
    with contextlib.ExitStack() as prepared_all:
        for name, prepared, is_peer in runners:
            entry = record["impls"][name] = {}
            with _outcome_recorded(entry, name, is_peer, case):
                call, to_bhld = prepared_all.enter_context(prepared(case, q, k, v, threads))
                # one call alone first: a runner that fails drops out before the timing
                outputs[name] = _bhld(call(), to_bhld)
                if name == BASELINE:
                    entry["status"] = "check only"
                else:
                    calls[name], converters[name] = call, to_bhld
        if log:
            log(f"  {case.name}: {', '.join(calls)} interleaved ...")
        timed = time_calls(calls, repeat, block=record["block"])
    for name in calls:
        outputs[name] = _bhld(timed.results[name], converters[name])  # the last one is checked
        _timed_entry(record["impls"][name], case, timed.times[name], timed.warmup[name])
    return outputs


def _compare(got, want, tolerance):
    """(max |got - want|, allclose) for a result against the reference."""
    if got.shape != want.shape:
        return float("inf"), False
    got, want = got.astype(np.float64), want.astype(np.float64)  # also bfloat16
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    return err, bool(np.allclose(got, want, **tolerance))


def _tolerance(case, name, is_peer):
    """np.allclose's tolerance for `name`'s result on `case`: pyattn-f32 is
    exact float32 (its inputs' dtype's), the others by Case.check_dtype."""
    if name == F32:
        return TOLERANCE[case.dtype]
    return (PEER_TOLERANCE if is_peer else TOLERANCE)[case.check_dtype]


def run_case(case, impls, threads, repeat=None, log=None, peers=()):
    """Time every implementation (`impls`, a subset of IMPLEMENTATIONS) and
    every Peer in `peers` on `case`; a dict of the measurements.

    The timing follows pyattn.bench.timing (`repeat`: --repeat, None for its
    time budget; the reference at most REFERENCE_MAX_REPEAT times).  A case
    of cases.INTERLEAVED_CASES (the latency and bf16 suites) is timed
    interleaved and the reference is not timed.  A case with ``with_f32``
    also times pyattn-f32 (ALONGSIDE), pyattn on its inputs as float32,
    exact.  The last result of each is compared, untimed, with the
    reference's (with pyattn's when the reference is not run); one that
    differs gets status "wrong".  A peer that declines the case is recorded
    as "n/a", one that raises as "error"; their cells carry no time.
    """
    q, k, v = case.make_inputs()
    interleaved = case.name in INTERLEAVED_CASES
    record = dict(asdict(case), shape=case.shape, mask=case.mask, flops=case.flops,
                  bytes=case.nbytes, threads=threads,
                  timing="interleaved" if interleaved else "one by one", impls={})
    if interleaved:
        record["block"] = LATENCY_BLOCK if case.name in LATENCY_CASES else THROUGHPUT_BLOCK
    if case.with_f32:
        impls = {**impls, **ALONGSIDE}
    runners = [(name, functools.partial(plain_prepared, fn), False) for name, fn in impls.items()]
    runners += [(peer.name, peer.prepared, True) for peer in peers]
    measure = _time_interleaved if interleaved else _time_each
    outputs = measure(case, runners, record, q, k, v, threads, repeat, log)

    checked_against = BASELINE if BASELINE in outputs else SUBJECT
    want = outputs.get(checked_against)
    record["checked_against"] = checked_against if want is not None else None
    for name, got in outputs.items():
        if name == checked_against or want is None:
            continue
        is_peer = name not in impls
        err, ok = _compare(got, want, _tolerance(case, name, is_peer))
        entry = record["impls"][name]
        entry.update(max_abs_err=err, matches=ok)
        if not ok:
            entry["status"] = "wrong"
    subject = record["impls"].get(SUBJECT, {})
    if SUBJECT in outputs and BASELINE in outputs:
        record["max_abs_err"] = subject["max_abs_err"]
        record["matches_reference"] = subject["matches"]
        if "median_ms" in record["impls"][BASELINE]:
            record["speedup"] = record["impls"][BASELINE]["median_ms"] / subject["median_ms"]
    # other / pyattn, for each result that is right (above 1: pyattn is faster)
    record["ratios"] = {
        name: (e["median_ms"] / subject["median_ms"]
               if e.get("status") == "ok" and "median_ms" in subject else None)
        for name, e in record["impls"].items() if name != SUBJECT
    }
    return record
