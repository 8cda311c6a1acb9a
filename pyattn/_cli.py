"""argparse ``type=`` validators shared by the command lines (pyattn.bench,
pyattn.walkthrough).

A bad argument must end in argparse's usage error (``prog: error: argument
--x: ...``, exit status 2) while the arguments are parsed, never in a
traceback from deep inside or at the end of a long benchmark run.
"""
import argparse
import os

from pyattn._plotting import import_figure


def int_range(low, high=None):
    """A ``type=`` for an int from `low` to `high` (None: no upper bound)."""
    if high is not None:
        wanted = f"an integer from {low} to {high}"
    else:
        wanted = {0: "a non-negative integer", 1: "a positive integer"}.get(
            low, f"an integer >= {low}")

    def parse(text):
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if n < low or (high is not None and n > high):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {n}")
        return n

    return parse


def output_file(text):
    """A ``type=`` for a file to be written: checked up front, so that a
    missing folder, a directory, a name too long or a folder that cannot be
    written is refused before the work, not after it.  The check opens the
    file for appending (what the write will need), which changes no file
    that exists; one that did not is removed again."""
    if not text:
        raise argparse.ArgumentTypeError("expected a file path, got ''")
    if text.endswith(("/", os.sep)) or os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} names a directory, not a file")
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"no such directory: {folder}")
    existed = os.path.exists(text)
    try:
        with open(text, "a"):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot write to {text}: {exc.strerror}") from None
    if not existed:
        os.remove(text)
    return text


def same_file(a, b):
    """Whether paths `a` and `b` name one file (through links too)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist (yet): not a link of the other
        return False


def plot_file(text):
    """A ``type=`` for --plot: a writable file in a format matplotlib saves.

    Without matplotlib (an optional extra) this is a usage error too: the
    option cannot be honoured here, and saying so before the work, exit
    status 2, is what a script calling the command can act on."""
    if text and not os.path.splitext(text)[1]:
        text += ".png"  # what matplotlib writes for a name without an extension
    path = output_file(text)
    Figure = import_figure()
    if Figure is None:
        raise argparse.ArgumentTypeError(
            'needs matplotlib, which is not installed: pip install matplotlib '
            '(or pip install "pyattn[bench]")')
    ext = os.path.splitext(path)[1][1:].lower()
    formats = Figure().canvas.get_supported_filetypes()
    if ext not in formats:
        raise argparse.ArgumentTypeError(
            f"matplotlib cannot save .{ext} files; use one of "
            + ", ".join("." + f for f in sorted(formats)))
    return path
