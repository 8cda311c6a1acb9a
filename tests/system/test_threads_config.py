"""Version and configuration reporting, and how many threads a call uses:
num_threads, OMP_NUM_THREADS, threadpoolctl, and the kernel choice."""
import json
import os
import platform
import re
import textwrap

import numpy as np
import pytest
import threadpoolctl

import pyattn
from pyattn import _attention, _dispatch, _launch
from pyattn._validation import prepare_attention

sdpa = pyattn.scaled_dot_product_attention


def cpus():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def small_problem(rng, L=520, heads=4):
    """24 work items, enough for 5 threads."""
    q = rng.standard_normal((2, heads, L, 16)).astype(np.float32)
    return q, q[..., ::-1, :].copy(), q[..., :8].copy()


# --------------------------------------------------------------------------
# Version and configuration
# --------------------------------------------------------------------------

def test_version_string():
    assert isinstance(pyattn.__version__, str)
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?(a|b|rc|dev|post)\d*)*(\+[\w.]+)?",
                        pyattn.__version__)
    assert pyattn.config()["version"] == pyattn.__version__


def test_version_matches_installed_metadata():
    """When this pyattn is an installed distribution, its metadata agrees."""
    from importlib import metadata

    try:
        dist = metadata.distribution("pyattn")
    except metadata.PackageNotFoundError:
        dist = None
    installed = None if dist is None else str(dist.locate_file("pyattn/__init__.py"))
    if installed and os.path.exists(installed) and os.path.samefile(  # (editable: elsewhere)
            os.path.dirname(installed), os.path.dirname(pyattn.__file__)):
        assert dist.version == pyattn.__version__
    # Either way the version is importable the documented way.
    from pyattn import __version__

    assert __version__ == pyattn.__version__


def test_config_contents():
    cfg = pyattn.config()
    for key in ("version", "openmp", "default_threads", "kernel"):
        assert key in cfg
    assert cfg["openmp"] is True  # the supported builds all have OpenMP
    assert cfg["default_threads"] == _attention.max_threads() >= 1
    assert cfg["kernel"] == _dispatch.KERNEL
    assert cfg["kernel"] in cfg["usable_kernels"]
    assert cfg["usable_kernels"][-1] == "baseline"
    assert cfg["numpy"] == np.__version__


def test_show_config_prints_the_facts(capsys):
    assert pyattn.show_config() is None
    text = capsys.readouterr().out
    cfg = pyattn.config()
    lines = {}
    for line in text.strip().splitlines():
        key, _, value = line.partition(":")
        lines[key.strip()] = value.strip()
    assert lines["version"] == pyattn.__version__
    assert lines["openmp"] == str(cfg["openmp"])
    assert lines["default_threads"] == str(_attention.max_threads())
    assert lines["kernel"] == _dispatch.KERNEL
    assert pyattn.__version__ in text


# --------------------------------------------------------------------------
# num_threads
# --------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_run_kernel_uses_exactly_n_threads(n, rng, exact_threads):
    q, k, v = small_problem(rng)
    prob = prepare_attention(q, k, v, None, False, None, False)
    work = np.empty(prob.work_shape, np.float32)
    assert _launch.run_kernel(prob, work, n) == n
    np.testing.assert_allclose(work, pyattn.reference.scaled_dot_product_attention(q, k, v),
                               rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_num_threads_n_uses_exactly_n(n, rng, spy_threads, exact_threads):
    q, k, v = small_problem(rng)
    sdpa(q, k, v, num_threads=n)
    sdpa(q, k, v, num_threads=np.int64(n))  # any integral type (the general path)
    assert spy_threads == [n, n]


@pytest.mark.parametrize("n", [2, 3, 5])
def test_num_threads_is_a_maximum_tiny_calls_run_on_the_caller(n, rng, spy_threads):
    """The cost model: a call with microseconds of work wakes no team, and
    one with fewer work items than threads uses one thread per item."""
    q, k, v = small_problem(rng)
    sdpa(q[0, 0, :1], k[0, 0, :3], v[0, 0, :3], num_threads=n)  # one item, tiny
    sdpa(q[:1, :2, :8], k[:1, :2, :64], v[:1, :2, :64], num_threads=n)  # 2 items, tiny
    assert spy_threads == [1, 1]


def test_team_size_grows_with_the_work(rng, spy_threads):
    """Decode against more and more keys: the team never shrinks as the work
    grows, starts at one thread and reaches every requested thread the
    machine has CPUs for (more never run faster)."""
    for S in (16, 256, 4096, 65536):
        q = rng.standard_normal((1, 8, 1, 64)).astype(np.float32)
        k = rng.standard_normal((1, 8, S, 64)).astype(np.float32)
        sdpa(q, k, k, num_threads=4)
    assert spy_threads[0] == 1 and spy_threads[-1] == min(4, cpus())
    assert spy_threads == sorted(spy_threads)


@pytest.mark.skipif(cpus() < 2, reason="needs 2 CPUs: a team of one is never started")
def test_an_inflated_start_up_estimate_recovers(rng, spy_threads):
    """A launch kept on one thread measures nothing, so an estimate inflated
    by a bad spell must decay by itself until a team runs and measures
    again; otherwise every later launch would stay on one thread."""
    q = rng.standard_normal((1, 8, 1, 64)).astype(np.float32)
    k = rng.standard_normal((1, 8, 16384, 64)).astype(np.float32)
    saved = _attention.thread_start_costs()
    try:
        _attention.set_thread_start_costs(1e8, 1e8)  # 0.1 s: far above this call's gain
        for _ in range(80):
            sdpa(q, k, k, num_threads=2)
        after = _attention.thread_start_costs()
    finally:
        _attention.set_thread_start_costs(*saved)
    assert spy_threads[0] == 1 and 2 in spy_threads
    assert min(after) < 1e8  # the estimate these launches used (warm or cold)


def test_num_threads_none_uses_the_openmp_default(rng, spy_threads, exact_threads):
    q, k, v = small_problem(rng)
    sdpa(q, k, v)
    sdpa(q, k, v, num_threads=None)
    assert spy_threads == [_attention.max_threads()] * 2


@pytest.mark.parametrize("back", range(1, 5))
def test_negative_num_threads_counts_back_from_the_cpus(back, rng, spy_threads, exact_threads):
    ncpu = cpus()
    q, k, v = small_problem(rng)
    if back > ncpu:
        with pytest.raises(ValueError, match="num_threads"):
            sdpa(q, k, v, num_threads=-back)
        assert spy_threads == []
    else:
        sdpa(q, k, v, num_threads=-back)
        assert spy_threads == [ncpu + 1 - back]


def test_minus_one_is_all_cpus(rng, spy_threads, exact_threads):
    q, k, v = small_problem(rng)
    sdpa(q, k, v, num_threads=-1)
    assert spy_threads == [cpus()]


def test_no_kernel_launch_for_empty_work(rng, spy_threads):
    q, k, v = small_problem(rng)
    sdpa(q[..., :0, :], k, v, num_threads=2)  # L = 0
    out = sdpa(q, k[..., :0, :], v[..., :0, :], num_threads=2)  # S = 0
    assert not out.any()
    assert spy_threads == []


# --------------------------------------------------------------------------
# OMP_NUM_THREADS and threadpoolctl
# --------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import json
    import numpy as np
    import pyattn
    from pyattn import _attention
    used = []
    _attention.record_launches(used)
    _attention.THREAD_COST_MODEL = False  # team sizes as requested
    q = np.random.default_rng(0).standard_normal((2, 4, 520, 16)).astype(np.float32)
    pyattn.scaled_dot_product_attention(q, q, q)
    pyattn.scaled_dot_product_attention(q, q, q, num_threads=2)
    print(json.dumps({"max_threads": _attention.max_threads(), "used": used,
                      "config": pyattn.config()["default_threads"],
                      "kernel": pyattn.config()["kernel"]}))
""")


def run_child(helpers, tmp_path, **env):
    proc = helpers.run_python(CHILD, cwd=tmp_path, **env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("omp", [1, 3])
def test_omp_num_threads_is_respected(omp, helpers, tmp_path):
    got = run_child(helpers, tmp_path, OMP_NUM_THREADS=omp)
    assert got["max_threads"] == omp
    assert got["config"] == omp
    # The default follows OMP_NUM_THREADS; an explicit num_threads overrides it.
    assert got["used"] == [omp, 2]


def test_without_omp_num_threads_default_is_all_cpus(helpers, tmp_path):
    got = run_child(helpers, tmp_path)
    assert got["max_threads"] == got["config"] == got["used"][0] == cpus()


def test_threadpoolctl_limits_are_respected(rng, spy_threads, exact_threads):
    q, k, v = small_problem(rng)
    before = _attention.max_threads()
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert _attention.max_threads() == 1
        assert pyattn.config()["default_threads"] == 1
        limited = sdpa(q, k, v)
        sdpa(q, k, v, num_threads=2)  # explicit still wins
    assert _attention.max_threads() == before
    sdpa(q, k, v)
    assert spy_threads == [1, 2, before]
    assert np.array_equal(limited, sdpa(q, k, v))


def test_threadpoolctl_sees_pyattn_openmp():
    info = threadpoolctl.threadpool_info()
    assert any(lib["user_api"] == "openmp" for lib in info), info
    with threadpoolctl.threadpool_limits(limits=1):  # all APIs
        assert _attention.max_threads() == 1


# --------------------------------------------------------------------------
# Kernel choice (PYATTN_ISA)
# --------------------------------------------------------------------------

def test_default_kernel_is_the_best_usable():
    usable = _dispatch.usable_kernels()
    requested = os.environ.get(_dispatch.ENV_VAR, "").strip().lower()
    assert _dispatch.KERNEL == (requested if requested in usable else usable[0])
    assert list(usable) == [n for n in _attention.kernel_names() if n in usable]
    assert all(_attention.has_kernel(n) for n in usable)
    assert _attention.kernel_names()[-1] == "baseline" and _attention.cpu_supports("baseline")
    assert not _attention.has_kernel("no-such-kernel")
    assert not _attention.cpu_supports("no-such-kernel")


def test_registry_order_and_cpu_checks_match_the_cpu():
    """The build's kernel sets, best first, each usable exactly when the CPU
    flags its target needs are present (read from /proc/cpuinfo, not CPUID)."""
    names = _attention.kernel_names()
    if platform.machine() not in ("x86_64", "AMD64"):
        assert names == ("baseline",)
        return
    assert names == ("amx", "avx512_bf16", "avx512", "avx2", "baseline")
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split()[2:])
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags to compare the CPU checks with")
    avx512 = {"avx512f", "avx512dq", "avx512vl", "avx512bw", "avx2", "fma", "f16c"}
    needs = {"amx": avx512 | {"avx512_bf16", "amx_tile", "amx_bf16"},
             "avx512_bf16": avx512 | {"avx512_bf16"}, "avx512": avx512,
             "avx2": {"avx2", "fma", "f16c"}}
    for name, required in needs.items():
        assert _attention.cpu_supports(name) == (required <= flags), name


@pytest.mark.parametrize("isa", _dispatch.usable_kernels())
def test_pyattn_isa_selects_a_kernel(isa, helpers, tmp_path):
    got = run_child(helpers, tmp_path, PYATTN_ISA=isa.upper())
    assert got["kernel"] == isa


def test_unusable_pyattn_isa_warns_and_falls_back(helpers, tmp_path):
    code = textwrap.dedent("""
        import json, warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import pyattn
        print(json.dumps({"kernel": pyattn.config()["kernel"],
                          "warnings": [(w.category.__name__, str(w.message)) for w in caught]}))
    """)
    proc = helpers.run_python(code, cwd=tmp_path, PYATTN_ISA="sse9000")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["kernel"] == _dispatch.usable_kernels()[0]
    assert any(cat == "RuntimeWarning" and "sse9000" in msg and "PYATTN_ISA" in msg
               for cat, msg in got["warnings"]), got["warnings"]


def test_short_openmp_spin_is_set_for_the_extension_only(helpers, tmp_path):
    """pyattn loads libgomp with a short spin (see pyattn/__init__.py) without
    leaving GOMP_SPINCOUNT in the environment, and a user's choice stands."""
    code = ("import os, pyattn; print(os.environ.get('GOMP_SPINCOUNT'), "
            "os.environ.get('OMP_WAIT_POLICY'))")
    assert helpers.run_python(code, cwd=tmp_path).stdout.split() == ["None", "None"]
    out = helpers.run_python(code, cwd=tmp_path, GOMP_SPINCOUNT="123").stdout.split()
    assert out == ["123", "None"]
