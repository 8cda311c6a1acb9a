"""What the --plot options of `python -m pyattn bench` and `demo` share:
matplotlib is an optional extra, so it is imported only when asked for."""
import os

PLOT_INSTALL_HINT = ('--plot needs matplotlib, which is not installed: pip install matplotlib '
                     '(or pip install "pyattn[bench]")')


def import_figure():
    """matplotlib's Figure class (no pyplot, no GUI backend), or None if absent."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure


def check_plot_option(parser, path):
    """Exit through `parser` (an argparse parser) unless a plot can be written
    to `path`: matplotlib is importable and the folder exists."""
    if import_figure() is None:
        parser.exit(2, f"{parser.prog}: error: {PLOT_INSTALL_HINT}\n")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        parser.error(f"--plot: no such directory: {folder}")
