"""``python -m pyattn SUBCOMMAND [options]``.

Subcommands:
  bench   benchmark pyattn against its NumPy reference and, when installed,
          PyTorch and ONNX Runtime (pyattn.bench)
  demo    the "我爱AI" walk-through of self-attention and multi-head
          attention (pyattn.walkthrough)
"""
import sys

USAGE = """usage: python -m pyattn SUBCOMMAND [options]

subcommands:
  bench   benchmark pyattn against its NumPy reference and, when installed,
          PyTorch and ONNX Runtime
          (python -m pyattn bench --help for its options)
  demo    walk through self-attention and multi-head attention on "我爱AI",
          step by step, checked against pyattn's layers
          (python -m pyattn demo --help for its options)
"""


PROG = "python -m pyattn"
COMMANDS = ("bench", "demo")


def _usage_error(message):
    """argparse's form: the usage, then one `prog: error:` line; status 2."""
    print(USAGE, end="", file=sys.stderr)
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        return _usage_error(f"a subcommand is required ({', '.join(COMMANDS)})")
    if argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "bench":
        from . import bench
        return bench.main(rest, prog=f"{PROG} bench")
    if command == "demo":
        from . import walkthrough
        walkthrough.main(rest, prog=f"{PROG} demo")  # exits nonzero on failure
        return 0
    return _usage_error(f"unknown subcommand {command!r} (choose from {', '.join(COMMANDS)})")


if __name__ == "__main__":
    sys.exit(main())
