/*
 * Per-thread scratch of the attention template (see attention_body.h): its
 * regions (packed Q, the K^T and V panels, one score tile, the accumulators),
 * their byte sizes, computed with checked arithmetic so that a size that
 * cannot be represented is SIZE_MAX and refused by the caller, never wrapped,
 * and carving one allocation into them.  Included after the products header,
 * whose tile sizes it reads.
 */
/* A block that is not whole micro-tiles overruns its scratch (MR = 12 with
 * BLOCK_M = 256 corrupts the heap): refuse such a block-size table. */
_Static_assert(BLOCK_M % MR == 0, "BLOCK_M must be a multiple of MR");
_Static_assert(BLOCK_N % NR == 0, "BLOCK_N must be a multiple of NV vectors");

/*
 * Scratch layout, per thread.  The K^T and V panels hold every key tile of one
 * (batch, key/value head) when that fits PANEL_BUDGET, so the head is packed
 * once per thread and reused by all the query blocks the thread takes; a
 * longer sequence gets a one-tile panel, repacked per tile.  The panels also
 * serve the direct path, which gathers strided key and value rows there.
 */
#define PANEL_BUDGET ((int64_t)32 << 20) /* bytes per thread */

typedef struct {
    PANEL *q_block;        /* block_rows x q_width: Q as the products read it */
    REAL *q_real;          /* the same region as block_rows x E of REAL: the direct path's Q */
    PANEL *kt_panel;       /* tiles of packed K^T, zero past the last key */
    PANEL *v_panel;        /* tiles of packed V, zero past Ev */
    REAL *scores;          /* BLOCK_M x BLOCK_N: scores, then weights */
    PANEL *p_block;        /* the weights as the products read them, if they differ */
    REAL *acc;             /* block_rows x evp: unnormalised output */
    REAL *row_max, *row_sum; /* BLOCK_M each */
    REAL scale_left;       /* what the scores are multiplied by: scale / what pack_q folded */
    int whole_head;        /* the panels hold all tiles of the head */
} FN(workspace);

/* Bytes of one packed key tile (SIZE_MAX when not representable: sizes are
 * checked, never wrapped). */
static size_t FN(tile_bytes)(const pyattn_problem *p)
{
    return pyattn_size_mul(pyattn_size_add(FN(kt_tile_elems)(p), FN(v_tile_elems)(p)),
                           sizeof(PANEL));
}

static int64_t FN(panel_tiles)(const pyattn_problem *p)
{
    const int64_t tiles = (p->S + BLOCK_N - 1) / BLOCK_N;
    const size_t bytes = pyattn_size_mul(FN(tile_bytes)(p), (size_t)tiles);
    return bytes <= (size_t)PANEL_BUDGET ? tiles : 1;
}

/* The byte sizes of the regions, in carve's order. */
typedef struct {
    size_t q, kt, v, scores, p_block, acc, rows;
} FN(regions);

static FN(regions) FN(region_bytes)(const pyattn_problem *p)
{
    const size_t E = (size_t)p->E, Ev = (size_t)p->Ev;
    const size_t tiles = (size_t)FN(panel_tiles)(p);
    const size_t evp = pyattn_size_mul(pyattn_size_add(Ev, NR - 1) / NR, NR);
    const size_t q_width = (size_t)FN(q_width)(p->E);
    FN(regions) b;
    const size_t rows = (size_t)FN(block_rows)(p), cols = (size_t)FN(tile_cols)(p);
    b.q = pyattn_size_mul(rows, q_width > E ? q_width : E);
    b.q = pyattn_size_mul(b.q, sizeof(REAL) > sizeof(PANEL) ? sizeof(REAL) : sizeof(PANEL));
    b.kt = pyattn_size_mul(pyattn_size_mul(tiles, FN(kt_tile_elems)(p)), sizeof(PANEL));
    b.v = pyattn_size_mul(pyattn_size_mul(tiles, FN(v_tile_elems)(p)), sizeof(PANEL));
    /* the direct path's gathered rows: tile_cols x E and x Ev of KV */
    const size_t k_rows = pyattn_size_mul(cols * sizeof(KV), E);
    const size_t v_rows = pyattn_size_mul(cols * sizeof(KV), Ev);
    b.kt = b.kt > k_rows ? b.kt : k_rows;
    b.v = b.v > v_rows ? b.v : v_rows;
    b.scores = BLOCK_M * BLOCK_N * sizeof(REAL);
    b.p_block = FN(p_block_elems) * sizeof(PANEL);
    b.acc = pyattn_size_mul(rows * sizeof(REAL), evp);
    b.rows = 2 * BLOCK_M * sizeof(REAL);
    return b;
}

/* Each region starts on a 64-byte boundary. */
static inline size_t FN(aligned)(size_t n) { return pyattn_size_add(n, 63) / 64 * 64; }

static size_t FN(scratch_bytes)(const pyattn_problem *p)
{
    const FN(regions) b = FN(region_bytes)(p);
    const size_t sizes[] = {b.q, b.kt, b.v, b.scores, b.p_block, b.acc, b.rows};
    size_t total = PYATTN_SCRATCH_HEADER;
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
        total = pyattn_size_add(total, FN(aligned)(sizes[i]));
    return total;
}

static FN(workspace) FN(carve)(const pyattn_problem *p, void *scratch)
{
    const FN(regions) b = FN(region_bytes)(p);
    const int64_t tiles = FN(panel_tiles)(p);
    FN(workspace) w;
    char *next = (char *)scratch + PYATTN_SCRATCH_HEADER;
    w.q_block = (PANEL *)next, w.q_real = (REAL *)next, next += FN(aligned)(b.q);
    w.kt_panel = (PANEL *)next, next += FN(aligned)(b.kt);
    w.v_panel = (PANEL *)next, next += FN(aligned)(b.v);
    w.scores = (REAL *)next, next += FN(aligned)(b.scores);
    w.p_block = (PANEL *)next, next += FN(aligned)(b.p_block);
    w.acc = (REAL *)next, next += FN(aligned)(b.acc);
    w.row_max = (REAL *)next;
    w.row_sum = w.row_max + BLOCK_M;
    w.whole_head = tiles > 1 || p->S <= BLOCK_N;
    return w;
}
