"""The command lines refuse every bad argument up front: ``python -m pyattn``,
``python -m pyattn demo`` (pyattn.walkthrough) and ``python -m pyattn.bench``
(also as ``python -m pyattn bench``).

Each bad command runs in a child interpreter and must end while its
arguments are parsed: exit status 2, nothing on stdout (no work started), no
traceback, and a last stderr line ``PROG: error: ...`` that names the
argument.  The children start in a pool as soon as the first test here runs;
each takes about as long as ``import pyattn``.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor

import pytest

from pyattn import _cli, bench
from pyattn.bench import cli as bench_cli
from pyattn.bench.cli import DEFAULT_PEERS

WORKERS = 2  # children at once
TIMEOUT = 60  # s: a child that passes its argument checks starts a real run

MAIN, DEMO, BENCH, SUB_BENCH = "main", "demo", "bench", "sub-bench"
COMMANDS = {  # -> (arguments before the options, prog in the error line)
    MAIN: (["-m", "pyattn"], "python -m pyattn"),
    DEMO: (["-m", "pyattn", "demo"], "python -m pyattn demo"),
    BENCH: (["-m", "pyattn.bench"], "python -m pyattn.bench"),
    SUB_BENCH: (["-m", "pyattn", "bench"], "python -m pyattn bench"),
}
# Made in the children's working directory by the `runs` fixture.
FILE, FOLDER, LOCKED = "file.txt", "folder", "locked"
PNG_FOLDER = "plotdir"  # a folder called plotdir.png: what --plot plotdir would write
LINKED = ("data.json", "data.png")  # one file under two names (a hard link)

# command, its options, text the error line must contain (the argument), and
# the package the child runs with hidden (matplotlib or dask[distributed]),
# which the error line then names
Bad = namedtuple("Bad", "command args names needs", defaults=(None,))

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

BAD = {
    # python -m pyattn
    "main-no-subcommand": Bad(MAIN, [], "subcommand"),
    "main-unknown-subcommand": Bad(MAIN, ["frob"], "'frob'"),
    # python -m pyattn demo
    "demo-seed-negative": Bad(DEMO, ["--seed", "-1"], "--seed"),
    "demo-seed-text": Bad(DEMO, ["--seed", "abc"], "--seed"),
    "demo-dtype-unknown": Bad(DEMO, ["--dtype", "float16"], "--dtype"),
    "demo-plot-missing-folder": Bad(DEMO, ["--plot", "/nonexistent/dir/w.png"], "--plot"),
    "demo-plot-format": Bad(DEMO, ["--plot", "w.xyz"], "--plot"),
    "demo-plot-no-extension": Bad(DEMO, ["--plot", PNG_FOLDER], "--plot"),
    "demo-plot-no-matplotlib": Bad(DEMO, ["--plot", "w.png"], "--plot", "matplotlib"),
    "demo-unknown-option": Bad(DEMO, ["--frob"], "--frob"),
    # python -m pyattn.bench: numbers
    "bench-threads-zero": Bad(BENCH, ["--threads", "0"], "--threads"),
    "bench-threads-negative": Bad(BENCH, ["--threads", "-2"], "--threads"),
    "bench-threads-huge": Bad(BENCH, ["--threads", "5000"], "--threads"),
    "bench-threads-text": Bad(BENCH, ["--threads", "two"], "--threads"),
    "bench-threads-missing": Bad(BENCH, ["--threads"], "--threads"),
    "bench-repeat-zero": Bad(BENCH, ["--repeat", "0"], "--repeat"),
    # names
    "bench-suite-unknown": Bad(BENCH, ["--suite", "nope"], "--suite"),
    "bench-cases-empty": Bad(BENCH, ["--cases", ""], "--cases"),
    "bench-cases-unknown": Bad(BENCH, ["--cases", "bert,nope"], "--cases"),
    "bench-peers-empty": Bad(BENCH, ["--peers", ""], "--peers"),
    "bench-peers-unknown": Bad(BENCH, ["--peers", "jax"], "--peers"),
    "bench-peers-none-and-a-name": Bad(BENCH, ["--peers", "torch,none"], "--peers"),
    # options that do not go together
    "bench-peers-and-no-peers": Bad(BENCH, ["--peers", "torch", "--no-peers"], "--no-peers"),
    "bench-memory-and-layers": Bad(BENCH, ["--memory", "--layers"], "--layers"),
    "bench-memory-and-cases": Bad(BENCH, ["--memory", "--cases", "bert"], "--cases"),
    "bench-memory-and-plot": Bad(BENCH, ["--memory", "--plot", "t.png"], "--plot"),
    "bench-layers-and-repeat": Bad(BENCH, ["--layers", "--repeat", "2"], "--repeat"),
    "bench-layers-and-no-peers": Bad(BENCH, ["--layers", "--no-peers"], "--no-peers"),
    "bench-models-and-cases": Bad(BENCH, ["--suite", "hf", "--cases", "bert"], "--cases"),
    "bench-models-and-layers": Bad(BENCH, ["--suite", "hf", "--layers"], "--layers"),
    # output paths: refused before the run, not at its end
    "bench-json-missing-folder": Bad(BENCH, ["--json", "/nonexistent/dir/x.json"], "--json"),
    "bench-json-is-folder": Bad(BENCH, ["--json", FOLDER], "--json"),
    "bench-json-folder-name": Bad(BENCH, ["--json", "new/"], "--json"),
    "bench-json-empty": Bad(BENCH, ["--json", ""], "--json"),
    "bench-json-same-as-plot": Bad(BENCH, ["--json", "t.png", "--plot", "./t.png"], "--json"),
    "bench-json-same-as-plot-no-extension": Bad(BENCH, ["--json", "t.png", "--plot", "t"],
                                                "--json"),
    "bench-json-hard-link-of-plot": Bad(BENCH, ["--json", LINKED[0], "--plot", LINKED[1]],
                                        "--json"),
    # names beyond the file system's 255 bytes (--plot's with the .png it adds)
    "bench-json-name-too-long": Bad(BENCH, ["--json", "j" * 300], "--json"),
    "bench-plot-name-too-long": Bad(BENCH, ["--plot", "p" * 252], "--plot"),
    "demo-plot-name-too-long": Bad(DEMO, ["--plot", "p" * 300 + ".png"], "--plot"),
    "bench-plot-missing-folder": Bad(BENCH, ["--plot", "/nonexistent/dir/t.png"], "--plot"),
    "bench-plot-no-matplotlib": Bad(BENCH, ["--plot", "t.png"], "--plot", "matplotlib"),
    # --suite dask
    "bench-dask-and-cases": Bad(BENCH, ["--suite", "dask", "--cases", "bert"], "--cases"),
    "bench-dask-and-plot": Bad(BENCH, ["--suite", "dask", "--plot", "t.png"], "--plot"),
    "bench-dask-threads-3": Bad(BENCH, ["--suite", "dask", "--threads", "3"], "--threads"),
    "bench-dask-and-memory": Bad(BENCH, ["--suite", "dask", "--memory"], "--suite"),
    "bench-dask-no-distributed": Bad(BENCH, ["--suite", "dask"], "--suite", "dask[distributed]"),
    # the rest
    "bench-unknown-option": Bad(BENCH, ["--frob"], "--frob"),
    "bench-ambiguous-option": Bad(BENCH, ["--no"], "--no"),
    "bench-extra-argument": Bad(BENCH, ["extra"], "extra"),
    "sub-bench-threads-huge": Bad(SUB_BENCH, ["--threads", "5000"], "--threads"),
    "bench-json-unwritable-folder": Bad(BENCH, ["--json", f"{LOCKED}/x.json"], "--json"),
    "demo-plot-unwritable-folder": Bad(DEMO, ["--plot", f"{LOCKED}/w.png"], "--plot"),
}
# root may write into any folder, so the check rightly lets these through
# (and the child would start a real run): not run as root
NOT_AS_ROOT = {"bench-json-unwritable-folder", "demo-plot-unwritable-folder"}


def _run(bad, cwd, env):
    """CompletedProcess of one bad command, or None when it did not end in time."""
    head, _ = COMMANDS[bad.command]
    try:
        return subprocess.run([sys.executable, *head, *bad.args], cwd=cwd, env=env,
                              capture_output=True, text=True, encoding="utf-8",
                              timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return None


@pytest.fixture(scope="module")
def runs(helpers, tmp_path_factory):
    """{id: future CompletedProcess} for the BAD commands, all started at once."""
    cwd = tmp_path_factory.mktemp("cli")
    (cwd / FILE).write_text("")
    (cwd / FOLDER).mkdir()
    (cwd / (PNG_FOLDER + ".png")).mkdir()
    (cwd / LINKED[0]).write_text("")
    os.link(cwd / LINKED[0], cwd / LINKED[1])
    (cwd / LOCKED).mkdir(mode=0o555)
    # a matplotlib and a distributed that fail to import, first on the path
    hidden = tmp_path_factory.mktemp("hidden")
    for package in ("matplotlib", "distributed"):
        (hidden / package).mkdir()
        (hidden / package / "__init__.py").write_text(
            f'raise ImportError("{package} hidden by test_cli")\n')
    env = helpers.child_env(PYTHONIOENCODING="utf-8")
    env_hidden = dict(env, PYTHONPATH=os.pathsep.join([str(hidden), env["PYTHONPATH"]]))
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        yield {name: pool.submit(_run, bad, cwd, env_hidden if bad.needs else env)
               for name, bad in BAD.items() if not (AS_ROOT and name in NOT_AS_ROOT)}
    (cwd / LOCKED).chmod(0o755)  # so that pytest can remove it


@pytest.mark.parametrize("name", BAD)
def test_bad_argument_is_a_usage_error(name, runs):
    if name not in runs:
        pytest.skip("run as root, who may write into any folder")
    bad = BAD[name]
    head, prog = COMMANDS[bad.command]
    command = shlex.join(["python", *head, *bad.args])
    proc = runs[name].result()
    assert proc is not None, f"{command}: still running after {TIMEOUT} s (it was not refused)"
    detail = f"{command}\nexit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 2, detail
    assert "Traceback" not in proc.stderr, detail
    assert proc.stdout == "", detail  # refused before any work
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines, detail
    assert lines[-1].startswith(f"{prog}: error: "), detail
    assert [line for line in lines if ": error:" in line] == lines[-1:], detail  # one line
    assert bad.names in lines[-1], detail
    if bad.needs:
        assert f"needs {bad.needs}" in lines[-1], detail


def test_bench_help(helpers, tmp_path):
    """The one valid command run here: the parser builds, --help exits 0."""
    proc = subprocess.run([sys.executable, "-m", "pyattn.bench", "--help"], cwd=tmp_path,
                          env=helpers.child_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m pyattn.bench") and proc.stderr == ""


@pytest.mark.parametrize("args, names, peers", [
    ([], list(bench.SUITES[bench.DEFAULT_SUITE]), list(DEFAULT_PEERS)),
    (["--suite", "inference"], list(bench.SUITES["inference"]), list(DEFAULT_PEERS)),
    (["--suite", "latency"], list(bench.SUITES["latency"]), list(DEFAULT_PEERS)),
    # the bf16 suite: by default the peers that run bfloat16 products
    (["--suite", "bf16"], list(bench.SUITES["bf16"]), ["torch", "openvino"]),
    (["--suite", "bf16", "--peers", "onnxruntime"], list(bench.SUITES["bf16"]), ["onnxruntime"]),
    (["--suite", "bf16", "--no-peers"], list(bench.SUITES["bf16"]), []),
    (["--cases", "prefill-bf16", "--suite", "bf16"], ["prefill-bf16"], list(bench.PEERS)),
    (["--cases", "trivial,bert"], ["trivial", "bert"], list(bench.PEERS)),
    (["--cases", " bert , causal ", "--suite", "full"], ["bert", "causal"], list(bench.PEERS)),
    (["--peers", "none"], list(bench.SUITES["quick"]), []),
    (["--no-peers", "--no-reference"], list(bench.SUITES["quick"]), []),
    (["--peers", "onnxruntime,torch", "--threads", "1024", "--repeat", "1"],
     list(bench.SUITES["quick"]), ["onnxruntime", "torch"]),
    # --memory and --layers run no table: neither list is used
    (["--memory", "--threads", "2", "--json", "m.json"], None, None),
    (["--layers", "--json", "l.json"], None, None),
    (["--suite", "hf", "--threads", "1"], None, None),
])
def test_valid_bench_arguments_still_parse(args, names, peers, tmp_path, monkeypatch):
    """In this process, without running anything: what main() would run."""
    monkeypatch.chdir(tmp_path)
    parser = bench_cli.build_parser()
    got_names, got_peers = bench_cli._check_args(parser, parser.parse_args(args))
    if names is not None:
        assert (got_names, got_peers) == (names, peers)


def test_unwritable_path_is_refused(tmp_path, monkeypatch):
    """The permission branch, in this process (as root no folder is unwritable)."""
    def refuse(path, mode):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(_cli, "open", refuse, raising=False)
    with pytest.raises(argparse.ArgumentTypeError, match="cannot write to .*: Permission denied"):
        _cli.output_file(str(tmp_path / "x.json"))


def test_output_check_leaves_no_file_and_changes_none(tmp_path):
    new, old = tmp_path / "new.json", tmp_path / "old.json"
    old.write_text("kept")
    assert _cli.output_file(str(new)) == str(new) and not new.exists()
    assert _cli.output_file(str(old)) == str(old) and old.read_text() == "kept"


def test_latency_suite_runs(helpers, tmp_path):
    """The latency suite end to end, shortened (2 calls each, torch the only
    peer): exit 0, a row per case, every case in the JSON, pyattn right on each."""
    names = bench.SUITES["latency"]
    proc = subprocess.run([sys.executable, "-m", "pyattn.bench", "--suite", "latency",
                           "--repeat", "2", "--threads", "1", "--peers", "torch",
                           "--json", "latency.json"],
                          cwd=tmp_path, env=helpers.child_env(PYTHONIOENCODING="utf-8"),
                          capture_output=True, text=True, encoding="utf-8", timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    assert all(name in rows for name in names), proc.stdout
    assert "pyattn µs" in proc.stdout and "p10-p90" in proc.stdout, proc.stdout
    results = json.loads((tmp_path / "latency.json").read_text())["results"]
    assert [r["name"] for r in results] == list(names)
    for r in results:
        assert r["timing"] == "interleaved" and r["matches_reference"], r["name"]
        assert r["impls"]["pyattn"]["repeat"] == 2, r["name"]
