/* Small-K float32 matrix products for KernelWarehouse kernel assembly (CPU).
 *
 * A KW layer's kernel assembly is a product with a short inner dimension
 * (the warehouse's n cells, or B·m mixtures in the cell gradient) and a very
 * long outer one (a cell's numel: 262,144 in ResNet50's last stage), which
 * general-purpose BLAS kernels tile poorly. The two shapes here:
 *
 *   kw_gemm_nn: C[M,N] = A[M,K] · B[K,N]      (mixtures, cell gradient)
 *   kw_gemm_nt: C[M,P] = G[M,D] · E[P,D]^T    (attention gradient)
 *
 * All matrices are row-major with unit column stride and a leading dimension.
 * Built by kw_mm/native/__init__.py with -march=native; without AVX-512F
 * kw_gemm_available() returns 0 and kw_mm keeps torch's matmul.
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

static inline __mmask16 lane_mask(int64_t remaining)
{
    if (remaining >= 16) return (__mmask16)0xFFFF;
    if (remaining <= 0) return (__mmask16)0;
    return (__mmask16)((1u << remaining) - 1u);
}

/* C rows [i, i+rows) × columns [j, j+cols) with rows ≤ R, cols ≤ 16·V, the
 * R × V accumulators in registers (R and V are constants once inlined:
 * 6 × 4 or 8 × 3, 24 accumulators either way). Missing rows read the last
 * valid row of A and are not stored. */
static inline __attribute__((always_inline)) void
nn_block(const int R, const int V, int64_t rows, int64_t cols, int64_t K,
         const float *A, int64_t lda, const float *B, int64_t ldb, float *C, int64_t ldc,
         int stream)
{
    const float *a[8];
    for (int r = 0; r < R; ++r) a[r] = A + (r < rows ? r : rows - 1) * lda;
    __mmask16 m[4];
    for (int v = 0; v < V; ++v) m[v] = lane_mask(cols - 16 * v);
    __m512 acc[8][4];
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
        const float *b = B + k * ldb;
        __m512 bv[4];
        for (int v = 0; v < V; ++v) bv[v] = _mm512_maskz_loadu_ps(m[v], b + 16 * v);
        for (int r = 0; r < R; ++r) {
            __m512 s = _mm512_set1_ps(a[r][k]);
            for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(s, bv[v], acc[r][v]);
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

/* All of C in tiles of 8 × 48 (tall) or 6 × 64; the literal shapes inside the
 * parallel loop keep the accumulators in registers. */
static void nn_tiles(int tall, int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                     const float *B, int64_t ldb, float *C, int64_t ldc, int stream, int nthreads)
{
    const int64_t R = tall ? 8 : 6, width = tall ? 48 : 64;
    int64_t tiles = (N + width - 1) / width;
    #pragma omp parallel num_threads(nthreads)
    {
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; ++t) {
            int64_t j = t * width;
            int64_t cols = N - j < width ? N - j : width;
            for (int64_t i = 0; i < M; i += R) {
                int64_t rows = M - i < R ? M - i : R;
                if (tall)
                    nn_block(8, 3, rows, cols, K, A + i * lda, lda, B + j, ldb,
                             C + i * ldc + j, ldc, stream);
                else
                    nn_block(6, 4, rows, cols, K, A + i * lda, lda, B + j, ldb,
                             C + i * ldc + j, ldc, stream);
            }
        }
        /* each thread orders its own streaming stores before the region ends */
        if (stream) _mm_sfence();
    }
}

void kw_gemm_nn(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                const float *B, int64_t ldb, float *C, int64_t ldc, int nthreads)
{
    /* an output larger than a typical L3 share is not read back soon enough to keep */
    int stream = (double)M * (double)N * 4.0 > 16.0 * 1024 * 1024;
    /* the row height that computes the fewest padding rows (B·m is often a multiple of 8) */
    int64_t pad6 = (M + 5) / 6 * 6, pad8 = (M + 7) / 8 * 8;
    nn_tiles(pad8 <= pad6, M, N, K, A, lda, B, ldb, C, ldc, stream, nthreads);
}

#define NT_ROWS 4   /* rows of G per register tile */
#define NT_COLS 6   /* rows of E per register tile */
#define NT_CHUNK 2048

/* Partial sums of G[i..i+4) · E[j..j+6)^T over d in [d0, d1), kept as 16-lane
 * vectors in vec[(i·P_pad + j)·16]. */
static void nt_chunk(int64_t M, int64_t P, int64_t P_pad, int64_t d0, int64_t d1,
                     const float *G, int64_t ldg, const float *E, int64_t lde, float *vec)
{
    for (int64_t i = 0; i < M; i += NT_ROWS) {
        const float *g[NT_ROWS];
        for (int r = 0; r < NT_ROWS; ++r) g[r] = G + (i + r < M ? i + r : M - 1) * ldg;
        for (int64_t j = 0; j < P; j += NT_COLS) {
            const float *e[NT_COLS];
            for (int c = 0; c < NT_COLS; ++c) e[c] = E + (j + c < P ? j + c : P - 1) * lde;
            __m512 acc[NT_ROWS][NT_COLS];
            for (int r = 0; r < NT_ROWS; ++r)
                for (int c = 0; c < NT_COLS; ++c)
                    acc[r][c] = _mm512_load_ps(vec + ((i + r) * P_pad + j + c) * 16);
            int64_t d = d0;
            for (; d + 16 <= d1; d += 16) {
                __m512 ev[NT_COLS];
                for (int c = 0; c < NT_COLS; ++c) ev[c] = _mm512_loadu_ps(e[c] + d);
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
        int t = 0, T = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        T = omp_get_num_threads();
#endif
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

#else /* no AVX-512F: kw_mm uses torch's matmul */

int kw_gemm_available(void) { return 0; }
void kw_gemm_nn(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                const float *B, int64_t ldb, float *C, int64_t ldc, int nthreads) { abort(); }
int kw_gemm_nt(int64_t M, int64_t P, int64_t D, const float *G, int64_t ldg,
               const float *E, int64_t lde, float *C, int64_t ldc, int nthreads) { abort(); }

#endif
