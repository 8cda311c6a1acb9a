"""The "我爱AI" attention walk-through: the same code as `python -m pyattn demo`.

    pip install .                      # matplotlib too, for --plot
    python examples/walkthrough.py [--seed N] [--dtype float64] [--plot weights.png]

The implementation lives in pyattn/walkthrough.py; this script only calls it,
so the example and the command can never drift apart.
"""
from pyattn.walkthrough import main

if __name__ == "__main__":
    main(prog="python examples/walkthrough.py")
