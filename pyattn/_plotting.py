"""What the --plot options of `python -m pyattn bench` and `demo` share:
matplotlib is an optional extra, so it is imported only when asked for
(pyattn._cli.plot_file checks it while the arguments are parsed)."""


def import_figure():
    """matplotlib's Figure class (no pyplot, no GUI backend), or None if absent."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure
