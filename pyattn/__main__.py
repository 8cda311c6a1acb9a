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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "bench":
        from . import bench
        return bench.main(rest, prog="python -m pyattn bench")
    if command == "demo":
        from . import walkthrough
        walkthrough.main(rest, prog="python -m pyattn demo")  # exits nonzero on failure
        return 0
    print(f"python -m pyattn: unknown subcommand {command!r}\n", file=sys.stderr)
    print(USAGE, end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
