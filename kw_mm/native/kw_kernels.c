/* Float32 CPU kernels for KernelWarehouse layers (AVX-512F, OpenMP).
 *
 * A KW layer's kernel assembly is a product with a short inner dimension
 * (the warehouse's n cells, or B·m mixtures in the cell gradient) and a very
 * long outer one (a cell's numel: 262,144 in ResNet50's last stage), which
 * general-purpose BLAS kernels tile poorly; its per-sample convolutions are
 * sums of such products over kernel positions. One register-tiled product
 * (nn_block) runs them all. The entry points, in the order of this file:
 *
 *   kw_gemm_available    1 where this file was compiled with AVX-512F, else 0
 *   kw_gemm_nn           C[M,N] = A[M,K] · B[K,N]     (mixtures, cell gradient)
 *   kw_gemm_nn_batched   the same for a batch of independent products
 *                        (a 1×1 KW convolution; A may be read transposed)
 *   kw_conv_taps         each sample's 2-d convolution with its own kernel,
 *                        as a sum of products over kernel positions ("taps")
 *   kw_fused_taps        kw_conv_taps of kernels assembled strip by strip from
 *                        the attentions and cells, never stored whole
 *   kw_gemm_nt           C[M,P] = G[M,D] · E[P,D]^T   (attention gradient)
 *   kw_fused_kernel_grad the attentions' and cells' gradients of kw_fused_taps
 *
 * All matrices are row-major with unit column stride and a leading dimension.
 * Built by kw_mm/native/library.py with -march=native; the ctypes signatures
 * are in kw_mm/native/bindings.py. Without AVX-512F kw_gemm_available()
 * returns 0 and kw_mm keeps torch's products.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__)
#include <immintrin.h>

int kw_gemm_available(void) { return 1; }

/* The calling thread's number in the enclosing OpenMP team, and the team's size
 * (0 and 1 without OpenMP). */
static inline int thread_id(void)
{
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static inline int thread_count(void)
{
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

static inline __mmask16 lane_mask(int64_t remaining)
{
    if (remaining >= 16) return (__mmask16)0xFFFF;
    if (remaining <= 0) return (__mmask16)0;
    return (__mmask16)((1u << remaining) - 1u);
}

/* A sum of products C = Σ_t A_t · B_t over "taps" t < count, A_t at
 * A + a_off[t] and B_t at B + b_off[t] (a plain product: one tap at 0). With
 * B a zero-padded image [K, rows × width] and b_off[t] the offset of kernel
 * position t, this is a stride-1 convolution over that padded grid (see
 * kw_conv_taps; a strided one reads the image's phases). */
typedef struct {
    int64_t count;
    const int64_t *b_off, *a_off;
    /* NULL, or which lanes of each 16-column vector u of C read each tap:
     * bit l of masks[u·count + t] (the others read zero). An image without
     * padding columns (see kw_conv_taps) masks the positions a shift takes
     * past its borders. */
    const uint16_t *masks;
} taps_t;

static const int64_t no_offset[1] = {0};
#define ONE_TAP {1, no_offset, no_offset, NULL}

#define TRANSPOSED_PREFETCH 32

/* bytes of output past which stores bypass the cache */
#define L3_SHARE (16.0 * 1024 * 1024)

/* C rows [i, i+rows) × columns [j, j+cols) with rows ≤ R, cols ≤ 16·V, the
 * R × V accumulators in registers (R and V are constants once inlined: at
 * most 8 × 3 or 6 × 4, 24 accumulators). A[r, k] is at A + r·ars + k·aks
 * (aks = 1 for a row-major A, ars = 1 for a transposed one). Missing rows
 * read the last valid row of A and are not stored. */
static inline __attribute__((always_inline)) void
nn_block(const int R, const int V, int64_t rows, int64_t cols, int64_t K,
         const float *A, int64_t ars, int64_t aks, const float *B, int64_t ldb, float *C,
         int64_t ldc, int stream, const taps_t *taps, const uint16_t *tile_masks)
{
    const float *a[8];
    __mmask16 m[4];
    for (int v = 0; v < V; ++v) m[v] = lane_mask(cols - 16 * v);
    __m512 acc[8][4];
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
    for (int64_t t = 0; t < taps->count; ++t) {
        const float *At = A + taps->a_off[t];
        for (int r = 0; r < R; ++r) a[r] = At + (r < rows ? r : rows - 1) * ars;
        const float *Bt = B + taps->b_off[t];
        __mmask16 mt[4];
        for (int v = 0; v < V; ++v)
            mt[v] = tile_masks ? m[v] & tile_masks[v * taps->count + t] : m[v];
        for (int64_t k = 0; k < K; ++k) {
            /* A read transposed steps aks floats per k (a kernel's rows, 2 KB and
             * more): a new page every few steps, where hardware prefetchers stop.
             * Ask for the line TRANSPOSED_PREFETCH steps ahead (a line past the
             * tap's block at its end: harmless) */
            if (aks != 1)
                _mm_prefetch((const char *)(a[0] + (k + TRANSPOSED_PREFETCH) * aks), _MM_HINT_T0);
            const float *b = Bt + k * ldb;
            __m512 bv[4];
            for (int v = 0; v < V; ++v) bv[v] = _mm512_maskz_loadu_ps(mt[v], b + 16 * v);
            for (int r = 0; r < R; ++r) {
                __m512 s = _mm512_set1_ps(a[r][k * aks]);
                for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(s, bv[v], acc[r][v]);
            }
        }
    }
    for (int r = 0; r < R; ++r) {
        if (r >= rows) break;
        float *c = C + r * ldc;
        if (stream && cols == 16 * V && ((uintptr_t)c & 63) == 0) {
            /* large outputs bypass the cache: no read-for-ownership of lines we overwrite */
            for (int v = 0; v < V; ++v) _mm512_stream_ps(c + 16 * v, acc[r][v]);
        } else {
            for (int v = 0; v < V; ++v) _mm512_mask_storeu_ps(c + 16 * v, m[v], acc[r][v]);
        }
    }
}

#define PREFETCH_MAX_K 256
#define PREFETCH_MIN_LDB 4096

/* One column tile [j, j+cols) of C against rows [i0, i1), in register tiles of
 * 8 × 3 vectors (tall, 48 wide) or 6 × 4 (wide, 64 wide); a narrower tail tile
 * runs with fewer vectors. The literal shapes keep the accumulators in
 * registers; a row-major A (aks = 1) gets its own specialisation. */
#define NN_BLOCK(R, V) \
    (aks == 1 ? nn_block(R, V, rows, cols, K, a, ars, 1, b, ldb, c, ldc, stream, taps, tm) \
              : nn_block(R, V, rows, cols, K, a, ars, aks, b, ldb, c, ldc, stream, taps, tm))
static inline void nn_strip(int tall, int64_t i0, int64_t i1, int64_t j, int64_t cols, int64_t K,
                            const float *A, int64_t ars, int64_t aks, const float *B, int64_t ldb,
                            float *C, int64_t ldc, int stream, const taps_t *taps)
{
    const int64_t R = tall ? 8 : 6;
    int vectors = (int)((cols + 15) / 16);
    /* j is a multiple of 16: tiles are 48 or 64 columns wide */
    const uint16_t *tm = taps->masks ? taps->masks + j / 16 * taps->count : NULL;
    if (taps->count == 1 && K <= PREFETCH_MAX_K && ldb >= PREFETCH_MIN_LDB) {
        /* a few long rows of B (the cells): each tile's panel is K short stretches
         * far apart, more streams than the hardware prefetcher follows. Ask for
         * the next tile's panel (into L2) while this one is computed. */
        const float *next = B + j + cols;
        for (int64_t k = 0; k < K; ++k)
            for (int v = 0; v < vectors; ++v)
                _mm_prefetch((const char *)(next + k * ldb + 16 * v), _MM_HINT_T1);
    }
    for (int64_t i = i0; i < i1; i += R) {
        int64_t rows = i1 - i < R ? i1 - i : R;
        const float *a = A + i * ars;
        const float *b = B + j;
        float *c = C + i * ldc + j;
        if (tall) {
            if (vectors == 3) NN_BLOCK(8, 3);
            else if (vectors == 2) NN_BLOCK(8, 2);
            else NN_BLOCK(8, 1);
        } else {
            if (vectors == 4) NN_BLOCK(6, 4);
            else if (vectors == 3) NN_BLOCK(6, 3);
            else if (vectors == 2) NN_BLOCK(6, 2);
            else NN_BLOCK(6, 1);
        }
    }
}
#undef NN_BLOCK

/* Columns computed for N in tiles of `width`, the last one in whole vectors. */
static int64_t padded_cols(int64_t N, int64_t width)
{
    int64_t full = N / width * width;
    return full + (N - full + 15) / 16 * 16;
}

/* Whether 8 × 48 tiles compute less padding than 6 × 64 ones for C[M, N]. */
static int tall_tiles(int64_t M, int64_t N)
{
    double work_tall = (double)((M + 7) / 8 * 8) * (double)padded_cols(N, 48);
    double work_wide = (double)((M + 5) / 6 * 6) * (double)padded_cols(N, 64);
    return work_tall <= work_wide;
}

/* C_b = A_b · B_b for b < batch, the operands of sample b at b · (sa, sb, sc)
 * floats from the first; A_b[r, k] at A + b·sa + r·ars + k·aks. With groups
 * > 1, group g's product (C at g·gc floats further) sums taps[g] (a sum of
 * products per group, all reading the same B_b). The work is split into
 * (sample, group, column tile, row range) units: one row range when there are
 * enough tiles to keep every thread busy (each B panel then stays in one
 * thread's cache), more when not (few samples with narrow outputs, e.g. a
 * late ResNet stage at 7 × 7). */
static void nn_run(int64_t batch, int64_t groups, int64_t M, int64_t N, int64_t K,
                   const float *A, int64_t sa, int64_t ars, int64_t aks,
                   const float *B, int64_t sb, int64_t ldb,
                   float *C, int64_t sc, int64_t gc, int64_t ldc, const taps_t *taps,
                   int nthreads)
{
    if (nthreads < 1) nthreads = 1;
    /* an output larger than a typical L3 share is not read back soon enough to keep */
    int stream = (double)groups * M * (double)N * 4.0 > L3_SHARE;
    int tall = tall_tiles(M, N);
    const int64_t R = tall ? 8 : 6, width = tall ? 48 : 64;
    int64_t tiles = (N + width - 1) / width, strips = (M + R - 1) / R;
    int64_t ranges = 1, wanted = 4 * (int64_t)nthreads, outer = batch * groups * tiles;
    if (outer < wanted) {
        ranges = (wanted + outer - 1) / outer;
        if (ranges > strips) ranges = strips;
    }
    int64_t units = outer * ranges;
    #pragma omp parallel num_threads(nthreads)
    {
        #pragma omp for schedule(static)
        for (int64_t u = 0; u < units; ++u) {
            int64_t r = u % ranges, t = u / ranges % tiles, g = u / ranges / tiles % groups;
            int64_t b = u / ranges / tiles / groups;
            int64_t i0 = strips * r / ranges * R, i1 = strips * (r + 1) / ranges * R;
            if (i1 > M) i1 = M;
            int64_t j = t * width;
            int64_t cols = N - j < width ? N - j : width;
            nn_strip(tall, i0, i1, j, cols, K, A + b * sa, ars, aks, B + b * sb, ldb,
                     C + b * sc + g * gc, ldc, stream, taps + g);
        }
        /* each thread orders its own streaming stores before the region ends */
        if (stream) _mm_sfence();
    }
}

void kw_gemm_nn_batched(int64_t batch, int64_t M, int64_t N, int64_t K,
                        const float *A, int64_t sa, int64_t ars, int64_t aks,
                        const float *B, int64_t sb, int64_t ldb,
                        float *C, int64_t sc, int64_t ldc, int nthreads)
{
    taps_t one = ONE_TAP;
    nn_run(batch, 1, M, N, K, A, sa, ars, aks, B, sb, ldb, C, sc, 0, ldc, &one, nthreads);
}

void kw_gemm_nn(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                const float *B, int64_t ldb, float *C, int64_t ldc, int nthreads)
{
    kw_gemm_nn_batched(1, M, N, K, A, 0, lda, 1, B, 0, ldb, C, 0, ldc, nthreads);
}

/* A stride-1 convolution of each sample's padded image B_b [channels, ldb]
 * (rows of the padded grid laid end to end) with its kernel, in groups:
 * C_b[g·gc + (r, q)] = Σ_t A_b[g, t] · B_b[:, q + b_off[t]] over t < taps, for
 * every group g < groups, output row r < M and grid position q < N, where
 * A_b[g, t][r, k] is at A + b·sa + a_off[g·taps + t] + r·ars + k·aks (k < K).
 * A tap is a kernel position, or a kernel position and a group of K input
 * channels (b_off then also points at that group's first channel); a group
 * is a group of M output channels, as KW's kernel partition cuts a layer into
 * cells. For stride s the caller lays out the s × s phases of the image side
 * by side in each row of B and points each kernel position into its phase.
 * ars = K, aks = 1 reads the kernel as it is; ars = 1, aks = M reads each
 * block transposed (the input's gradient: a correlation of the output's
 * gradient with the transposed kernel positions). With masks (see taps_t),
 * B_b is the image itself, unpadded, and the output has its size (a stride-1
 * convolution that keeps the size, e.g. 3 × 3 with padding 1): b_off[t] is
 * then the shift of kernel position t (negative for the positions above and
 * left of centre), and the masks zero the lanes whose shifted position falls
 * outside the image, so there are no padding columns to compute and no
 * padded copy of the input. Returns 0, or -1 if its table of taps could not
 * be allocated (C untouched). */
int kw_conv_taps(int64_t batch, int64_t groups, int64_t M, int64_t N, int64_t K, int64_t taps,
                 const float *A, int64_t sa, int64_t ars, int64_t aks, const int64_t *a_off,
                 const float *B, int64_t sb, int64_t ldb, const int64_t *b_off,
                 const uint16_t *masks, float *C, int64_t sc, int64_t gc, int64_t ldc,
                 int nthreads)
{
    taps_t *kernel = malloc((size_t)(groups > 0 ? groups : 1) * sizeof(taps_t));
    if (!kernel) return -1;
    for (int64_t g = 0; g < groups; ++g) {
        taps_t one = {taps, b_off, a_off + g * taps, masks};
        kernel[g] = one;
    }
    nn_run(batch, groups, M, N, K, A, sa, ars, aks, B, sb, ldb, C, sc, gc, ldc, kernel, nthreads);
    free(kernel);
    return 0;
}

/* A KW convolution's inference without its per-sample kernels in memory.
 * The layer has gout output groups of M channels each and m = gout · taps
 * mixtures per sample; mixture mix[o·taps + t] of a sample is group o's
 * kernel for tap t (a kernel position, or a kernel position and a group of
 * K input channels: b_off[t] points into the input accordingly), an [M, K]
 * matrix. Its values are α[(b, i)] · E_i: α [batch·m, ncells] with row stride
 * lda, E_i the cells [ncells, M·K] with row stride lde, at E + i·e_mix (e_mix = 0:
 * every mixture mixes the same cells, a warehouse; else each mixture has its own
 * set, e.g. a layer's inference basis, see kw_mm/layers/basis.py).
 *
 * For each strip of FUSED_STRIP rows of the cells, that strip of every mixture
 * of every sample is assembled into a per-thread buffer (one pass over that
 * strip of E for all of them) and used at once by kw_conv_taps' sum of
 * products for those rows of every output group (masks: as kw_conv_taps').
 * Returns 0, or -1 if the buffers could not be allocated (C untouched). */
#define FUSED_STRIP 8
int kw_fused_taps(int64_t batch, int64_t M, int64_t N, int64_t K, int64_t taps, int64_t gout,
                  int64_t ncells, const float *alpha, int64_t lda, const float *E, int64_t lde,
                  int64_t e_mix, const float *B, int64_t sb, int64_t ldb, const int64_t *b_off,
                  const uint16_t *masks, const int64_t *mix, float *C, int64_t sc, int64_t ldc,
                  int nthreads)
{
    if (nthreads < 1) nthreads = 1;
    const int64_t SR = FUSED_STRIP, m = gout * taps, rows_a = batch * m, cols_a = SR * K;
    size_t per_thread = ((size_t)rows_a * cols_a + 15) / 16 * 16;
    float *work = aligned_alloc(64, per_thread * nthreads * sizeof(float));
    int64_t *a_off = malloc((size_t)m * sizeof(int64_t));
    if (!work || !a_off) {
        free(work);
        free(a_off);
        return -1;
    }
    for (int64_t i = 0; i < m; ++i) a_off[i] = mix[i] * cols_a;
    taps_t one = ONE_TAP;
    /* shared cells: one product [batch·m, ncells] × [ncells, strip]; own cells:
     * one [batch, ncells] × [ncells, strip] per mixture (rows m apart in W) */
    int64_t rows_p = e_mix ? batch : rows_a, mixes = e_mix ? m : 1;
    int tall_a = tall_tiles(rows_p, cols_a), tall_c = tall_tiles(SR, N);
    int64_t width_a = tall_a ? 48 : 64, width_c = tall_c ? 48 : 64;
    int64_t strips = (M + SR - 1) / SR;
    #pragma omp parallel num_threads(nthreads)
    {
        float *W = work + per_thread * thread_id();
        #pragma omp for schedule(static)
        for (int64_t s = 0; s < strips; ++s) {
            int64_t r0 = s * SR, rows = M - r0 < SR ? M - r0 : SR, used = rows * K;
            for (int64_t i = 0; i < mixes; ++i)
                for (int64_t j = 0; j < used; j += width_a)
                    nn_strip(tall_a, 0, rows_p, j, used - j < width_a ? used - j : width_a,
                             ncells, alpha + i * lda, lda * (mixes > 1 ? m : 1), 1,
                             E + i * e_mix + r0 * K, lde, W + i * cols_a,
                             cols_a * (mixes > 1 ? m : 1), 0, &one);
            for (int64_t b = 0; b < batch; ++b)
                for (int64_t o = 0; o < gout; ++o) {
                    taps_t kernel = {taps, b_off, a_off + o * taps, masks};
                    for (int64_t j = 0; j < N; j += width_c)
                        nn_strip(tall_c, 0, rows, j, N - j < width_c ? N - j : width_c, K,
                                 W + b * m * cols_a, K, 1, B + b * sb, ldb,
                                 C + b * sc + (o * M + r0) * ldc, ldc, 0, &kernel);
                }
        }
    }
    free(work);
    free(a_off);
    return 0;
}

#define NT_ROWS 4   /* rows of G per register tile */
#define NT_COLS 6   /* rows of E per register tile */
#define NT_CHUNK 2048

/* Partial sums of G[i..i+4) · E[j..j+6)^T over d in [d0, d1), kept as 16-lane
 * vectors in vec[(i·P_pad + j)·16]. Each tile of E rows stays in L1 while it
 * meets every tile of G rows. */
static void nt_chunk(int64_t M, int64_t P, int64_t P_pad, int64_t d0, int64_t d1,
                     const float *G, int64_t ldg, const float *E, int64_t lde, float *vec)
{
    for (int64_t j = 0; j < P; j += NT_COLS) {
        const float *e[NT_COLS];
        for (int c = 0; c < NT_COLS; ++c) e[c] = E + (j + c < P ? j + c : P - 1) * lde;
        for (int64_t i = 0; i < M; i += NT_ROWS) {
            const float *g[NT_ROWS];
            for (int r = 0; r < NT_ROWS; ++r) g[r] = G + (i + r < M ? i + r : M - 1) * ldg;
            __m512 acc[NT_ROWS][NT_COLS];
            for (int r = 0; r < NT_ROWS; ++r)
                for (int c = 0; c < NT_COLS; ++c)
                    acc[r][c] = _mm512_load_ps(vec + ((i + r) * P_pad + j + c) * 16);
            int64_t d = d0;
            for (; d + 16 <= d1; d += 16) {
                __m512 ev[NT_COLS];
                for (int c = 0; c < NT_COLS; ++c) {
                    ev[c] = _mm512_loadu_ps(e[c] + d);
                    /* keep the E vectors in registers: left to itself the compiler
                     * folds them into every FMA as memory operands, 28 loads per 24
                     * FMAs instead of 10 (1.3x slower on the reference CPU) */
                    __asm__("" : "+v"(ev[c]));
                }
                for (int r = 0; r < NT_ROWS; ++r) {
                    __m512 gv = _mm512_loadu_ps(g[r] + d);
                    for (int c = 0; c < NT_COLS; ++c)
                        acc[r][c] = _mm512_fmadd_ps(gv, ev[c], acc[r][c]);
                }
            }
            if (d < d1) {
                __mmask16 m = lane_mask(d1 - d);
                __m512 ev[NT_COLS];
                for (int c = 0; c < NT_COLS; ++c) ev[c] = _mm512_maskz_loadu_ps(m, e[c] + d);
                for (int r = 0; r < NT_ROWS; ++r) {
                    __m512 gv = _mm512_maskz_loadu_ps(m, g[r] + d);
                    for (int c = 0; c < NT_COLS; ++c)
                        acc[r][c] = _mm512_fmadd_ps(gv, ev[c], acc[r][c]);
                }
            }
            for (int r = 0; r < NT_ROWS; ++r)
                for (int c = 0; c < NT_COLS; ++c)
                    _mm512_store_ps(vec + ((i + r) * P_pad + j + c) * 16, acc[r][c]);
        }
    }
}

/* Returns 0, or -1 if the workspace could not be allocated (C untouched). */
int kw_gemm_nt(int64_t M, int64_t P, int64_t D, const float *G, int64_t ldg,
               const float *E, int64_t lde, float *C, int64_t ldc, int nthreads)
{
    if (nthreads < 1) nthreads = 1;
    int64_t M_pad = (M + NT_ROWS - 1) / NT_ROWS * NT_ROWS;
    int64_t P_pad = (P + NT_COLS - 1) / NT_COLS * NT_COLS;
    size_t per_thread = (size_t)M_pad * P_pad * 16;
    float *work = aligned_alloc(64, per_thread * nthreads * sizeof(float));
    if (!work) return -1;
    memset(work, 0, per_thread * nthreads * sizeof(float));
    int64_t vectors = (D + 15) / 16;
    #pragma omp parallel num_threads(nthreads)
    {
        int t = thread_id(), T = thread_count();
        /* each thread sums its own stretch of D, in L2-sized chunks */
        int64_t lo = vectors * t / T * 16, hi = vectors * (t + 1) / T * 16;
        if (hi > D) hi = D;
        for (int64_t d0 = lo; d0 < hi; d0 += NT_CHUNK) {
            int64_t d1 = d0 + NT_CHUNK < hi ? d0 + NT_CHUNK : hi;
            nt_chunk(M, P, P_pad, d0, d1, G, ldg, E, lde, work + per_thread * t);
        }
    }
    for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < P; ++j) {
            __m512 s = _mm512_setzero_ps();
            for (int t = 0; t < nthreads; ++t)
                s = _mm512_add_ps(s, _mm512_load_ps(work + per_thread * t + (i * P_pad + j) * 16));
            C[i * ldc + j] = _mm512_reduce_add_ps(s);
        }
    free(work);
    return 0;
}

/* The gradients of a KW convolution's attentions and cells without its
 * mixtures' gradient in memory. Mixture i = mix[o·taps + t] of sample b has
 * the gradient D[b, i] = G_b[o] · X_b[t]ᵀ, an [M, K] matrix: G_b[o] the
 * output's gradient for output group o (M rows of N grid columns at G + b·sg
 * + o·M·ldg, row stride ldg, zero in the grid's junk columns), X_b[t] the
 * input read by tap t (N rows of K channels at X + b·sx + x_off[t], row stride
 * ldx: the input grid transposed, shifted to the tap's kernel position and
 * input group). With α [batch·m, ncells] (row stride lda) and the cells E
 * [ncells, M·K] (row stride lde):
 *
 *   grad_alpha[(b, i), j] = Σ D[b, i] ⊙ E_j        (if grad_alpha)
 *   grad_cells[j]         = Σ_(b, i) α[(b, i), j] · D[b, i]   (if grad_cells)
 *
 * For each strip of FUSED_STRIP rows, that strip of every D[b, i] is computed
 * into a per-thread buffer and used at once by both products, so the B·m
 * mixture gradients (B × the layer's parameters) are neither written to
 * memory nor read back twice. grad_alpha [batch·m, ncells] (row stride ldga)
 * is overwritten; grad_cells [ncells, M·K] (row stride ldgc) too. Returns 0,
 * or -1 if the buffers could not be allocated (outputs untouched). */
#define GRAD_CHUNK 1024
int kw_fused_kernel_grad(int64_t batch, int64_t M, int64_t N, int64_t K, int64_t taps,
                         int64_t gout, int64_t ncells, const float *alpha, int64_t lda,
                         const float *E, int64_t lde, const float *G, int64_t sg, int64_t ldg,
                         const float *X, int64_t sx, int64_t ldx, const int64_t *x_off,
                         const int64_t *mix, float *grad_alpha, int64_t ldga,
                         float *grad_cells, int64_t ldgc, int nthreads)
{
    if (nthreads < 1) nthreads = 1;
    const int64_t SR = FUSED_STRIP, m = gout * taps, rows_d = batch * m, cols_d = SR * K;
    const int64_t P_pad = (ncells + NT_COLS - 1) / NT_COLS * NT_COLS;
    const int64_t M_pad = (rows_d + NT_ROWS - 1) / NT_ROWS * NT_ROWS;
    size_t buffer = ((size_t)rows_d * cols_d + 15) / 16 * 16;
    size_t partial = grad_alpha ? (size_t)M_pad * P_pad * 16 : 0;
    size_t per_thread = buffer + partial;
    float *work = aligned_alloc(64, per_thread * nthreads * sizeof(float));
    if (!work) return -1;
    if (partial)
        for (int t = 0; t < nthreads; ++t) memset(work + per_thread * t + buffer, 0,
                                                 partial * sizeof(float));
    taps_t one = ONE_TAP;
    /* a warehouse's gradient larger than a typical L3 share is written past the
     * cache (no read for ownership): autograd reads it back only to add it up */
    int stream = grad_cells && (double)ncells * M * K * 4.0 > L3_SHARE;
    int tall_d = tall_tiles(SR, K), tall_c = tall_tiles(ncells, cols_d);
    int64_t width_d = tall_d ? 48 : 64, width_c = tall_c ? 48 : 64;
    int64_t strips = (M + SR - 1) / SR;
    #pragma omp parallel num_threads(nthreads)
    {
        float *D = work + per_thread * thread_id();
        float *vec = D + buffer;
        #pragma omp for schedule(static)
        for (int64_t s = 0; s < strips; ++s) {
            int64_t r0 = s * SR, rows = M - r0 < SR ? M - r0 : SR, used = rows * K;
            /* this strip of every mixture's gradient: D[b·m + i] is [rows, K] */
            for (int64_t b = 0; b < batch; ++b)
                for (int64_t o = 0; o < gout; ++o)
                    for (int64_t t = 0; t < taps; ++t) {
                        const float *g = G + b * sg + (o * M + r0) * ldg;
                        float *d = D + (b * m + mix[o * taps + t]) * cols_d;
                        for (int64_t j = 0; j < K; j += width_d)
                            nn_strip(tall_d, 0, rows, j, K - j < width_d ? K - j : width_d, N,
                                     g, ldg, 1, X + b * sx + x_off[t], ldx, d, K, 0, &one);
                    }
            if (grad_cells)  /* αᵀ · D for this strip: rows of grad_cells owned by this thread */
                for (int64_t j = 0; j < used; j += width_c)
                    nn_strip(tall_c, 0, ncells, j, used - j < width_c ? used - j : width_c,
                             rows_d, alpha, 1, lda, D, cols_d, grad_cells + r0 * K, ldgc, stream,
                             &one);
            if (grad_alpha)  /* D · Eᵀ over this strip, in L2-sized chunks */
                for (int64_t d0 = 0; d0 < used; d0 += GRAD_CHUNK)
                    nt_chunk(rows_d, ncells, P_pad, d0, d0 + GRAD_CHUNK < used ? d0 + GRAD_CHUNK : used,
                             D, cols_d, E + r0 * K, lde, vec);
        }
        if (stream) _mm_sfence();
    }
    if (grad_alpha)
        for (int64_t i = 0; i < rows_d; ++i)
            for (int64_t j = 0; j < ncells; ++j) {
                __m512 acc = _mm512_setzero_ps();
                for (int t = 0; t < nthreads; ++t)
                    acc = _mm512_add_ps(acc, _mm512_load_ps(work + per_thread * t + buffer
                                                            + (i * P_pad + j) * 16));
                grad_alpha[i * ldga + j] = _mm512_reduce_add_ps(acc);
            }
    free(work);
    return 0;
}

#else /* no AVX-512F: kw_mm uses torch's matmul */

int kw_gemm_available(void) { return 0; }
void kw_gemm_nn(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                const float *B, int64_t ldb, float *C, int64_t ldc, int nthreads) { abort(); }
void kw_gemm_nn_batched(int64_t batch, int64_t M, int64_t N, int64_t K,
                        const float *A, int64_t sa, int64_t ars, int64_t aks,
                        const float *B, int64_t sb, int64_t ldb,
                        float *C, int64_t sc, int64_t ldc, int nthreads) { abort(); }
int kw_conv_taps(int64_t batch, int64_t groups, int64_t M, int64_t N, int64_t K, int64_t taps,
                 const float *A, int64_t sa, int64_t ars, int64_t aks, const int64_t *a_off,
                 const float *B, int64_t sb, int64_t ldb, const int64_t *b_off,
                 const uint16_t *masks, float *C, int64_t sc, int64_t gc, int64_t ldc,
                 int nthreads) { abort(); }
int kw_gemm_nt(int64_t M, int64_t P, int64_t D, const float *G, int64_t ldg,
               const float *E, int64_t lde, float *C, int64_t ldc, int nthreads) { abort(); }
int kw_fused_taps(int64_t batch, int64_t M, int64_t N, int64_t K, int64_t taps, int64_t gout,
                  int64_t ncells, const float *alpha, int64_t lda, const float *E, int64_t lde,
                  int64_t e_mix, const float *B, int64_t sb, int64_t ldb, const int64_t *b_off,
                  const uint16_t *masks, const int64_t *mix, float *C, int64_t sc, int64_t ldc,
                  int nthreads) { abort(); }

int kw_fused_kernel_grad(int64_t batch, int64_t M, int64_t N, int64_t K, int64_t taps,
                         int64_t gout, int64_t ncells, const float *alpha, int64_t lda,
                         const float *E, int64_t lde, const float *G, int64_t sg, int64_t ldg,
                         const float *X, int64_t sx, int64_t ldx, const int64_t *x_off,
                         const int64_t *mix, float *grad_alpha, int64_t ldga,
                         float *grad_cells, int64_t ldgc, int nthreads) { abort(); }

#endif
