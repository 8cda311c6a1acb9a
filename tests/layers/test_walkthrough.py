"""The "我爱AI" walk-through: pyattn.walkthrough, `python -m pyattn demo` and
examples/walkthrough.py.  main() returns its numbers, so the checks below are
on the weights and differences themselves, not only on the printed text."""
import os
import runpy
import subprocess
import sys
import warnings

import numpy as np
import pytest

import pyattn
from pyattn import walkthrough
from pyattn.__main__ import main as pyattn_main

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       "examples", "walkthrough.py")


def run(capsys, *argv):
    res = walkthrough.main(list(argv))
    return res, capsys.readouterr().out


def line_with(text, *needles):
    """The first printed line that contains every needle."""
    return next(line for line in text.splitlines() if all(n in line for n in needles))


def test_steps_shapes_and_checks(capsys):
    res, out = run(capsys)
    assert res.ok and "all checks passed" in out
    assert res.tokens == ("我", "爱", "A", "I") and res.x.shape == (4, 512)
    expected = {"X": (4, 512), "Q": (4, 512), "K": (4, 512), "V": (4, 512), "scores": (4, 4),
                "output": (4, 512), "mha Q": (4, 512), "heads Q": (8, 4, 64),
                "heads scores": (8, 4, 4), "heads output": (8, 4, 64), "concat": (4, 512),
                "mha output": (4, 512)}
    assert {k: res.shapes[k] for k in expected} == expected
    # ... and the printed lines say so
    assert "(4, 512) -> (4, 8, 64) -> (8, 4, 64)" in line_with(out, "Split 512 into 8 heads of 64")
    assert "-> (8, 4, 4)" in line_with(out, "Q_h·K_hᵀ / √64")
    assert "-> (4, 512)" in line_with(out, "Concatenate the heads")
    assert "-> (4, 512)" in line_with(out, "Output linear layer")
    assert "-> (4, 4)" in line_with(out, "Q·Kᵀ / √512")
    assert "RANDOM" in out and "positional encoding" in out

    # the layers' weights: the right shapes, rows summing to 1
    assert res.single_weights.shape == (4, 4) and res.head_weights.shape == (8, 4, 4)
    for w in (res.single_weights, res.head_weights):
        assert w.dtype == np.float32
        assert np.all(w >= 0)
        np.testing.assert_allclose(w.sum(axis=-1), 1, atol=1e-5)
    assert res.row_sum_error < 1e-5
    assert line_with(out, "rows sum to 1").endswith("OK")
    assert line_with(out, "rows of all 8 heads sum to 1").endswith("OK")

    # the layers equal the printed NumPy steps
    assert set(res.max_diff) == {"single output", "single weights", "mha output", "mha weights"}
    assert all(res.allclose.values())
    assert max(res.max_diff.values()) < 1e-4
    for name, diff in res.max_diff.items():
        assert f"max |diff| = {diff:.1e}  OK" in line_with(out, name, "np.allclose: True")

    # the printed matrices are the returned weights, labelled by token
    row = line_with(out, "我 ", f"{res.single_weights[0, 0]:8.4f}")
    assert "".join(f"{v:8.4f}" for v in res.single_weights[0]) in row
    for h in range(8):
        assert "".join(f"{v:8.4f}" for v in res.head_weights[h, 3]) in out


def test_float64_and_seed(capsys):
    a, _ = run(capsys, "--dtype", "float64", "--seed", "3")
    assert a.ok and a.head_weights.dtype == np.float64 and a.x.dtype == np.float64
    assert max(a.max_diff.values()) < 1e-10
    b, _ = run(capsys, "--dtype", "float64", "--seed", "3")
    c, _ = run(capsys, "--dtype", "float64", "--seed", "4")
    np.testing.assert_array_equal(a.head_weights, b.head_weights)
    assert not np.allclose(a.head_weights, c.head_weights)


def test_a_wrong_layer_fails_the_check(capsys, monkeypatch):
    """The comparison is not vacuous: a layer that is off by 1e-3 fails it."""
    class Off(pyattn.MultiHeadAttention):
        def __call__(self, *args, **kwargs):
            out, w = super().__call__(*args, **kwargs)
            return out + 1e-3, w

    monkeypatch.setattr(walkthrough.pyattn, "MultiHeadAttention", Off)
    with pytest.raises(SystemExit) as exc:
        walkthrough.main([])
    assert exc.value.code == 1
    out = capsys.readouterr().out
    assert "mha output       np.allclose: False" in out and "CHECK FAILED" in out


def test_plot_writes_png(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    path = str(tmp_path / "weights.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res, out = run(capsys, "--plot", path)
    assert not [w for w in caught if "glyph" in str(w.message).lower()]
    assert res.plot == path and f"wrote {path}" in out
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    if res.plot_font is None:
        assert "no font with CJK glyphs" in out and "wo ai" in out
    else:
        assert f"CJK font {res.plot_font}" in out


def test_plot_latin_fallback(capsys, tmp_path, monkeypatch):
    """Without a CJK font the plot still works, with pinyin labels and a note."""
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(walkthrough, "find_cjk_font", lambda *a: None)
    res, out = run(capsys, "--plot", str(tmp_path / "w.png"))
    assert res.plot_font is None and "no font with CJK glyphs" in out
    assert os.path.getsize(tmp_path / "w.png") > 0


def test_find_cjk_font_checks_the_glyphs():
    pytest.importorskip("matplotlib")
    found = walkthrough.find_cjk_font("AI")  # any text font has these
    assert found is not None and os.path.exists(found[1])
    cjk = walkthrough.find_cjk_font()
    # matplotlib ships "Last Resort", one placeholder glyph per block: never it
    assert cjk is None or "Last Resort" not in cjk[0]


def test_plot_without_matplotlib(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(SystemExit) as exc:
        walkthrough.main(["--plot", str(tmp_path / "w.png")])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert "pip install matplotlib" in captured.err and "Traceback" not in captured.err
    assert captured.out == "" and not (tmp_path / "w.png").exists()


def test_example_and_subcommand_use_the_same_main(capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(walkthrough, "main", lambda argv=None, prog=None: calls.append(argv))
    monkeypatch.setattr(sys, "argv", [EXAMPLE])
    runpy.run_path(EXAMPLE, run_name="__main__")
    assert pyattn_main(["demo", "--seed", "2"]) == 0
    assert calls == [None, ["--seed", "2"]]
    pyattn_main(["--help"])
    usage = capsys.readouterr().out
    assert "  bench " in usage and "  demo " in usage


def test_python_m_pyattn_demo(tmp_path, helpers):
    proc = subprocess.run([sys.executable, "-m", "pyattn", "demo", "--seed", "1"], cwd=tmp_path,
                          env=helpers.child_env(PYTHONIOENCODING="utf-8"), capture_output=True,
                          encoding="utf-8", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "(8, 4, 4)" in proc.stdout and "all checks passed" in proc.stdout
    assert proc.stderr == ""
