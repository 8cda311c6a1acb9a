"""Measurements that need a fresh interpreter (--memory: a peak RSS of its
own; --layers: no other library's idle threads): the child runs a snippet
that prints one JSON line last."""
import json
import os
import subprocess
import sys

import pyattn


class ChildFailed(RuntimeError):
    """The child exited nonzero; ``stderr`` holds what it said."""

    def __init__(self, what, returncode, stderr):
        super().__init__(f"{what} failed (exit {returncode}):\n{stderr}")
        self.stderr = stderr


def run_child(what, code, *args, env=None):
    """Run `code` (with `args` as sys.argv[1:]) in a fresh interpreter that
    imports this same pyattn, with `env` added to the environment; the JSON
    object on its last line of output."""
    # the pyattn this process runs (a checkout, an install), not whatever the child's path finds
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(pyattn.__file__)))
    child_env = dict(os.environ, **(env or {}))
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (pkg_parent, child_env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=child_env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ChildFailed(what, proc.returncode, proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])
