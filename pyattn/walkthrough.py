"""The "我爱AI" walk-through: self-attention and multi-head attention, step by step.

Run ``python -m pyattn demo`` (or ``python examples/walkthrough.py``; both call
:func:`main`).  Four tokens, 我 爱 A I, get 512-d embeddings; then

* one :class:`pyattn.SelfAttention` head: three linear layers make Q, K and V,
  the scores Q·Kᵀ are scaled by 1/√d_k, a softmax makes every row sum to 1 and
  the weights multiply V;
* a :class:`pyattn.MultiHeadAttention` with 8 heads of 64: project, split 512
  into 8 × 64, attend per head, concatenate, apply the output linear layer.

Every step is computed here in plain NumPy from the layer's own weights and
printed with its shape; then the layer itself is called and its output and
attention weights are compared with the steps.  ``--plot PATH`` draws the
4×4 weights as heatmaps (needs matplotlib).
"""
import argparse
import sys
import unicodedata
from dataclasses import dataclass, field

import numpy as np

import pyattn
from pyattn._cli import int_range, plot_file
from pyattn._plotting import import_figure

TOKENS = ("我", "爱", "A", "I")
TOKENS_TEXT = "".join(TOKENS)  # the characters a CJK font must have
# Plot labels when matplotlib finds no font with CJK glyphs (pinyin).
TOKENS_LATIN = ("wo", "ai", "A", "I")
EMBED_DIM = 512
NUM_HEADS = 8
# How far the step-by-step NumPy result may be from the layer's: the two sum
# the same products in different orders, so they agree to rounding only.
TOLERANCE = {"float32": dict(rtol=1e-4, atol=1e-5), "float64": dict(rtol=1e-10, atol=1e-12)}
# Softmax rows sum to 1 up to rounding; float32 rounding is about 1e-7.
ROW_SUM_TOL = 1e-5
# Families known to carry CJK glyphs, tried first so the common ones win over
# any other font that happens to cover the four characters.
CJK_FONT_HINTS = ("Noto Sans CJK", "Noto Serif CJK", "Source Han Sans", "Source Han Serif",
                  "WenQuanYi", "Droid Sans Fallback", "AR PL", "Noto Sans SC", "Noto Sans TC",
                  "Noto Sans JP", "SimHei", "Microsoft YaHei", "PingFang", "Hiragino",
                  "Heiti", "Arial Unicode")


@dataclass
class Result:
    """What :func:`main` computed, for tests and for use from Python."""
    tokens: tuple
    dtype: str
    x: np.ndarray                      # (4, 512) input: embeddings + positions
    shapes: dict = field(default_factory=dict)   # step name -> shape, in order
    single_weights: np.ndarray = None  # (4, 4) from SelfAttention
    head_weights: np.ndarray = None    # (8, 4, 4) from MultiHeadAttention
    max_diff: dict = field(default_factory=dict)  # "single output" etc. -> max |layer - steps|
    allclose: dict = field(default_factory=dict)  # same keys -> np.allclose(layer, steps)
    row_sum_error: float = 0.0         # max |row sum - 1| over all weights the layers returned
    plot: str = None                   # path written by --plot
    plot_font: str = None              # CJK font used by the plot, None: latin labels

    @property
    def ok(self):
        return all(self.allclose.values()) and self.row_sum_error < ROW_SUM_TOL


# ------------------------------------------------------------------ inputs
def positional_encoding(length, dim):
    """The sinusoidal encoding of "Attention Is All You Need":
    PE[p, 2i] = sin(p / 10000^(2i/dim)), PE[p, 2i+1] = cos(same)."""
    pos = np.arange(length)[:, None]
    freq = 10000.0 ** (-np.arange(0, dim, 2) / dim)
    pe = np.empty((length, dim))
    pe[:, 0::2] = np.sin(pos * freq)
    pe[:, 1::2] = np.cos(pos * freq)
    return pe


def softmax(scores):
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))  # shift: no overflow
    return e / e.sum(axis=-1, keepdims=True)


# -------------------------------------------------------------- printing
def _width(text):
    """Terminal columns: CJK characters are double width."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _pad(text, width, left=False):
    fill = " " * max(0, width - _width(text))
    return text + fill if left else fill + text


def format_matrix(m, labels, title=None, row_sums=False, indent="    "):
    """A matrix with token labels on both axes, as a list of lines."""
    lw = max(_width(s) for s in labels) + 2
    head = indent + " " * lw + "".join(_pad(s, 8) for s in labels)
    lines = [indent + title] if title else []
    lines.append(head + ("   row sum" if row_sums else ""))
    for label, row in zip(labels, m):
        line = indent + _pad(label, lw, left=True) + "".join(f"{v:8.4f}" for v in row)
        lines.append(line + (f"  {row.sum():8.6f}" if row_sums else ""))
    return lines


def side_by_side(blocks, gap=6, indent="      "):
    """Lay blocks of lines out next to each other (blocks of equal height)."""
    widths = [max(_width(s) for s in b) for b in blocks]
    return [indent + "".join(_pad(s, w + gap, left=True) for s, w in zip(row, widths)).rstrip()
            for row in zip(*blocks)]


def shape(a):
    return str(tuple(a.shape))


# ------------------------------------------------------------------- plot
def find_cjk_font(text=TOKENS_TEXT):
    """(family name, file) of an installed font that has a glyph for every
    character of `text`, or None.  The character map is checked, not just the
    name, so the plot never renders a missing glyph; distinct characters must
    map to distinct glyphs, which rules out fallback fonts such as matplotlib's
    own "Last Resort" that draw one placeholder per Unicode block."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    known = {f.fname: f.name for f in font_manager.fontManager.ttflist}
    # matplotlib's font list is cached at its first run, so a font installed
    # since then is only seen by scanning the system's font folders.
    paths = sorted(known, key=lambda p: (not any(h in known[p] for h in CJK_FONT_HINTS), p))
    paths += sorted(set(font_manager.findSystemFonts()) - set(known))
    chars = set(text)
    for path in paths:
        try:
            font = FT2Font(path)
            charmap = font.get_charmap()
        except (OSError, RuntimeError, ValueError):
            continue
        glyphs = {charmap.get(ord(c)) for c in chars}
        if None not in glyphs and len(glyphs) == len(chars):
            return known.get(path, font.family_name), path
    return None


def plot_weights(single, heads, path, seed):
    """Heatmaps: the SelfAttention head, then the 8 MHA heads in a 2×4 grid.
    Returns the CJK font family used, or None when the labels fell back to latin."""
    from matplotlib.font_manager import FontProperties

    Figure = import_figure()
    font = find_cjk_font()
    if font is None:
        labels, fp, text = TOKENS_LATIN, None, " ".join(TOKENS_LATIN)
    else:
        labels, fp, text = TOKENS, FontProperties(fname=font[1]), TOKENS_TEXT

    fig = Figure(figsize=(15, 6.2), dpi=100, layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[1, 3.3])

    def heatmap(ax, w, title):
        im = ax.imshow(w, vmin=0, vmax=1, cmap="viridis")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(labels)))
        ax.set_yticks(range(len(labels)))
        ax.set_xticklabels(labels, fontproperties=fp)
        ax.set_yticklabels(labels, fontproperties=fp)
        for i, row in enumerate(w):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if v < 0.5 else "black")
        return im

    ax = left.subplots()
    left.suptitle(f"SelfAttention: 1 head, d_k={EMBED_DIM}")
    heatmap(ax, single, "")
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    axes = right.subplots(2, 4)
    right.suptitle(f"MultiHeadAttention: {NUM_HEADS} heads, d_k={EMBED_DIM // NUM_HEADS}")
    for h, ax in enumerate(axes.flat):
        im = heatmap(ax, heads[h], f"head {h + 1}")
    right.colorbar(im, ax=axes, shrink=0.8, label="attention weight")
    fig.suptitle(f'Attention weights for "{text}"  (row: query, column: key; rows sum to 1; '
                 f'seed {seed})', fontproperties=fp, fontsize=13)
    fig.savefig(path)
    return None if font is None else font[0]


# -------------------------------------------------------------------- run
def build_parser(prog=None):
    p = argparse.ArgumentParser(
        prog=prog or "python -m pyattn demo",
        description='Walk through self-attention and multi-head attention on "我爱AI", '
                    "step by step, and check the steps against pyattn's layers.")
    p.add_argument("--seed", type=int_range(0), default=0,  # NumPy takes no negative seed
                   help="non-negative seed of the embeddings and of the layers' weights "
                        "(default: 0)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="dtype of the layers and of the steps (default: float32)")
    p.add_argument("--plot", metavar="PATH", type=plot_file,
                   help="save the attention weights as heatmaps in a PNG "
                        "(needs matplotlib: pip install matplotlib)")
    return p


def _compare(res, name, from_layer, from_steps):
    tol = TOLERANCE[res.dtype]
    res.max_diff[name] = float(np.max(np.abs(from_layer.astype(np.float64) - from_steps)))
    res.allclose[name] = bool(np.allclose(from_layer, from_steps, **tol))
    mark = "OK" if res.allclose[name] else "MISMATCH"
    return (f"      {name:<16} np.allclose: {res.allclose[name]}  "
            f"max |diff| = {res.max_diff[name]:.1e}  {mark}")


def _rows_check(res, weights):
    err = float(np.max(np.abs(weights.sum(axis=-1) - 1)))
    res.row_sum_error = max(res.row_sum_error, err)
    return f"max |row sum - 1| = {err:.1e}  {'OK' if err < ROW_SUM_TOL else 'FAILED'}"


def main(argv=None, prog=None):
    """Print the walk-through and return a :class:`Result`.  Exits with
    status 2 on a usage error (or --plot without matplotlib) and 1 when the
    layer does not match the steps."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)

    dtype = np.dtype(args.dtype)
    rng = np.random.default_rng(args.seed)
    L, E, H = len(TOKENS), EMBED_DIM, NUM_HEADS
    D = E // H

    def say(*lines):
        print(*lines, sep="\n", flush=True)

    # Step 0: the input.  Random, not learned: the walk-through is about the
    # mechanics, which do not depend on what the vectors mean.
    emb = rng.standard_normal((L, E))
    x = (emb + positional_encoding(L, E)).astype(dtype)
    res = Result(tokens=TOKENS, dtype=args.dtype, x=x)
    res.shapes["X"] = x.shape
    say(f'pyattn {pyattn.__version__} walk-through: attention on "我爱AI"  '
        f"(seed {args.seed}, {args.dtype})")
    say("")
    say("0. Input: the tokens " + " ".join(TOKENS) + f", L = {L}, d_model = {E}.")
    say("   The embeddings here are RANDOM (seeded N(0, 1) vectors, not a trained model),")
    say("   plus the sinusoidal positional encoding (sin on even dims, cos on odd dims):")
    say(f"   X = embedding + positional encoding   {shape(x)}")

    # Part 1: one head.  SelfAttention stores w_q, w_k, w_v in the math
    # convention, Q = X @ w_q (+ b_q).
    sa = pyattn.SelfAttention(E, dtype=dtype, rng=rng)

    def proj(w, b):
        return x @ w + (0 if b is None else b)

    q, k, v = proj(sa.w_q, sa.b_q), proj(sa.w_k, sa.b_k), proj(sa.w_v, sa.b_v)
    scores = q @ k.T / np.sqrt(sa.kdim)
    weights = softmax(scores)
    y = weights @ v
    res.shapes.update({"Q": q.shape, "K": k.shape, "V": v.shape, "scores": scores.shape,
                       "weights": weights.shape, "output": y.shape})
    say("")
    say(f"1. Self-attention, one head: pyattn.SelfAttention({E})")
    say("   a) Three linear layers make the queries, keys and values from the same X:")
    say(f"      Q = X·W_q   {shape(x)} · {shape(sa.w_q)} -> {shape(q)}")
    say(f"      K = X·W_k   {shape(x)} · {shape(sa.w_k)} -> {shape(k)}")
    say(f"      V = X·W_v   {shape(x)} · {shape(sa.w_v)} -> {shape(v)}")
    say("   b) Scores: each query against each key, scaled by 1/√d_k so that they do")
    say(f"      not grow with the dimension:  Q·Kᵀ / √{sa.kdim}   "
        f"{shape(q)} · {shape(k.T)} -> {shape(scores)}")
    say("   c) Softmax along each row turns the scores into weights that sum to 1.")
    say(f"   d) Each output row is the weighted sum of the rows of V:  weights·V -> {shape(y)}")
    y_layer, w_layer = sa(x, return_weights=True)
    res.single_weights = w_layer
    say("")
    say("   The weights the layer returns (row: the query token; column: the key it attends to):")
    say(*format_matrix(w_layer, TOKENS, row_sums=True, indent="      "))
    say("   rows sum to 1: " + _rows_check(res, w_layer))
    say("   sa(X, return_weights=True) equals the NumPy steps above:")
    say(_compare(res, "single output", y_layer, y))
    say(_compare(res, "single weights", w_layer, weights))

    # Part 2: multi-head.  MultiHeadAttention keeps torch's layout: one
    # (3E, E) in_proj_weight whose row blocks are W_q, W_k, W_v, y = x @ W.T + b.
    mha = pyattn.MultiHeadAttention(E, H, dtype=dtype, rng=rng)
    w_q, w_k, w_v = np.split(mha.in_proj_weight, 3)
    b_q, b_k, b_v = (np.split(mha.in_proj_bias, 3) if mha.in_proj_bias is not None
                     else (0, 0, 0))
    q, k, v = x @ w_q.T + b_q, x @ w_k.T + b_k, x @ w_v.T + b_v

    def split(a):  # (L, E) -> (L, H, D) -> (H, L, D): head h owns dims h*D .. h*D+D-1
        return a.reshape(L, H, D).transpose(1, 0, 2)

    qh, kh, vh = split(q), split(k), split(v)
    scores = qh @ kh.transpose(0, 2, 1) / np.sqrt(D)
    weights = softmax(scores)
    yh = weights @ vh
    concat = yh.transpose(1, 0, 2).reshape(L, E)
    y = concat @ mha.out_proj_weight.T + (0 if mha.out_proj_bias is None else mha.out_proj_bias)
    res.shapes.update({"mha Q": q.shape, "mha K": k.shape, "mha V": v.shape,
                       "heads Q": qh.shape, "heads K": kh.shape, "heads V": vh.shape,
                       "heads scores": scores.shape, "heads weights": weights.shape,
                       "heads output": yh.shape, "concat": concat.shape, "mha output": y.shape})
    say("")
    say(f"2. Multi-head attention: pyattn.MultiHeadAttention({E}, num_heads={H}), "
        f"d_k = {E}/{H} = {D}")
    say(f"   a) Project: three linear layers (the row blocks of in_proj_weight "
        f"{shape(mha.in_proj_weight)}),")
    say("      y = X·Wᵀ + b:")
    say(f"      Q, K, V = X·W_qᵀ + b_q, X·W_kᵀ + b_k, X·W_vᵀ + b_v   {shape(q)} each")
    say(f"   b) Split {E} into {H} heads of {D}: {shape(q)} -> ({L}, {H}, {D}) -> {shape(qh)}")
    say("      (no copy of the data: a reshape and a transpose)")
    say(f"   c) Attend in every head at once, with its own {D}-d slice:")
    say(f"      scores  Q_h·K_hᵀ / √{D}   {shape(qh)} · {shape(kh.transpose(0, 2, 1))} "
        f"-> {shape(scores)}")
    say(f"      softmax per row, then weights·V_h   {shape(weights)} · {shape(vh)} "
        f"-> {shape(yh)}")
    say(f"   d) Concatenate the heads: {shape(yh)} -> ({L}, {H}, {D}) -> {shape(concat)}")
    say(f"   e) Output linear layer: concat·W_oᵀ + b_o   {shape(concat)} · "
        f"{shape(mha.out_proj_weight.T)} -> {shape(y)}")
    y_layer, w_layer = mha(x, x, x, need_weights=True, average_attn_weights=False)
    res.head_weights = w_layer
    say("")
    say(f"   The weights of each head (need_weights=True, average_attn_weights=False "
        f"gives {shape(w_layer)}):")
    blocks = [format_matrix(w_layer[h], TOKENS, title=f"head {h + 1}", indent="")
              for h in range(H)]
    for i in range(0, H, 2):
        say(*side_by_side(blocks[i:i + 2]))
    say(f"   rows of all {H} heads sum to 1: " + _rows_check(res, w_layer))
    say("   mha(X, X, X, need_weights=True, average_attn_weights=False) equals the steps:")
    say(_compare(res, "mha output", y_layer, y))
    say(_compare(res, "mha weights", w_layer, weights))

    if args.plot:
        res.plot_font = plot_weights(res.single_weights, res.head_weights, args.plot, args.seed)
        res.plot = args.plot
        say("")
        if res.plot_font is None:
            say("note: matplotlib found no font with CJK glyphs, so the plot labels "
                "我 爱 as wo ai (pinyin);")
            say("      install one (e.g. the Debian package fonts-noto-cjk) for the characters.")
        else:
            say(f"plot labels use the CJK font {res.plot_font}")
        say(f"wrote {args.plot}")

    say("")
    say("all checks passed" if res.ok else "CHECK FAILED: the layer does not match the steps")
    if not res.ok:
        sys.exit(1)
    return res


if __name__ == "__main__":
    main()
