"""``python -m pyattn.bench``: see pyattn.bench."""
import sys

from pyattn.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
