/* CPU twin of the Triton norm kernels: LayerNorm / RMSNorm with Triton's Philox normal stream.
 *
 * Built on first use by pipeline/kernels/native.py (gcc -O3 -march=native -ffast-math -fopenmp).
 * Philox 4x32-10 and the Box-Muller step copy triton/language/random.py exactly, so the integers
 * and uniforms are bit-identical; -ffast-math lets gcc use glibc's vector logf/cosf, whose results
 * stay within a few ulp of Triton's normals. Rows run in parallel; dγ/dβ are summed per fixed block
 * of rows and then over blocks in order, so results do not depend on the thread count.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define CHUNK 64            /* columns per Philox batch (stays in L1, vectorizes) */
#define ROWS_PER_BLOCK 32   /* rows per dγ/dβ partial: fixed, for determinism */
/* Without noise the caller passes a one-element placeholder for row_ids: never index past it. */
#define ROW_ID(r) (sigma != 0.0f ? row_ids[r] : 0)

/* The first two output words of Philox 4x32-10 for counters first_offset .. + count (count <= CHUNK). */
static void philox_words(uint64_t key, uint64_t first_offset, int64_t count, uint32_t *c0, uint32_t *c1) {
    uint32_t c2[CHUNK], c3[CHUNK];
    for (int64_t i = 0; i < count; i++) {
        uint64_t offset = first_offset + (uint64_t)i;
        c0[i] = (uint32_t)offset;
        c1[i] = (uint32_t)(offset >> 32);
        c2[i] = 0;
        c3[i] = 0;
    }
    uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
    for (int round = 0; round < 10; round++) {
        for (int64_t i = 0; i < count; i++) {
            uint64_t pb = (uint64_t)0xCD9E8D57u * c2[i];
            uint64_t pa = (uint64_t)0xD2511F53u * c0[i];
            uint32_t n0 = (uint32_t)(pb >> 32) ^ c1[i] ^ k0;
            uint32_t n2 = (uint32_t)(pa >> 32) ^ c3[i] ^ k1;
            c1[i] = (uint32_t)pb;
            c3[i] = (uint32_t)pa;
            c0[i] = n0;
            c2[i] = n2;
        }
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
}

static void philox_normals(uint64_t key, uint64_t first_offset, int64_t count, float *out) {
    uint32_t c0[CHUNK], c1[CHUNK];
    philox_words(key, first_offset, count, c0, c1);
    for (int64_t i = 0; i < count; i++) {
        int32_t a = (int32_t)c0[i], b = (int32_t)c1[i];
        a = a < 0 ? ~a : a;
        b = b < 0 ? ~b : b;
        float u1 = fmaxf(1.0e-7f, (float)a * 4.6566127342e-10f);
        float u2 = (float)b * 4.6566127342e-10f;
        out[i] = sqrtf(-2.0f * logf(u1)) * cosf(6.283185307179586f * u2);
    }
}

/* One chunk of a row, from `start`: x̂ and x̂ + σ·ε (the same values when σ = 0). Returns its length. */
static int64_t normalized_chunk(const float *xr, float mean, float rstd, float sigma, uint64_t key, int64_t row_id,
                                int64_t n, int64_t start, float *xhat, float *noisy) {
    int64_t count = n - start < CHUNK ? n - start : CHUNK;
    for (int64_t i = 0; i < count; i++) xhat[i] = (xr[start + i] - mean) * rstd;
    if (sigma == 0.0f) {
        memcpy(noisy, xhat, count * sizeof(float));
        return count;
    }
    philox_normals(key, (uint64_t)(row_id * n + start), count, noisy);
    for (int64_t i = 0; i < count; i++) noisy[i] = xhat[i] + sigma * noisy[i];
    return count;
}

void philox_normal_rows(uint64_t key, const int64_t *row_ids, int64_t rows, int64_t n, float *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < n; c += CHUNK)
            philox_normals(key, (uint64_t)(row_ids[r] * n + c), n - c < CHUNK ? n - c : CHUNK, out + r * n + c);
}

/* tl.rand(key, row_id·n + channel) in [0, 1): the uniforms of the embedding (NEFTune) noise. The caller
 * maps them to [−1, 1) in torch: here -ffast-math could fuse 2u − 1 into one FMA and round differently. */
void philox_uniform_rows(uint64_t key, const int64_t *row_ids, int64_t rows, int64_t n, float *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < n; c += CHUNK) {
            uint32_t w0[CHUNK], w1[CHUNK];
            int64_t count = n - c < CHUNK ? n - c : CHUNK;
            philox_words(key, (uint64_t)(row_ids[r] * n + c), count, w0, w1);
            for (int64_t i = 0; i < count; i++) {
                int32_t a = (int32_t)w0[i];
                out[r * n + c + i] = (float)(a < 0 ? ~a : a) * 4.6566127342e-10f;
            }
        }
}

void norm_forward(const float *x, int64_t stride_x, const float *w, const float *b, float *y,
                  float *mean_out, float *rstd_out, int64_t rows, int64_t n, float eps, float w_offset,
                  int is_rms, float sigma, uint64_t key, const int64_t *row_ids, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * stride_x;
        float *yr = y + r * n;
        float xhat[CHUNK], noisy[CHUNK];
        float sum = 0.0f, squares = 0.0f;
        if (!is_rms)
            for (int64_t c = 0; c < n; c++) sum += xr[c];
        float mean = sum / n;
        for (int64_t c = 0; c < n; c++) {
            float centered = xr[c] - mean;
            squares += centered * centered;
        }
        float rstd = 1.0f / sqrtf(squares / n + eps);
        for (int64_t start = 0; start < n; start += CHUNK) {
            int64_t count = normalized_chunk(xr, mean, rstd, sigma, key, ROW_ID(r), n, start, xhat, noisy);
            for (int64_t i = 0; i < count; i++) {
                int64_t c = start + i;
                float out = noisy[i] * (w[c] + w_offset);
                yr[c] = b ? out + b[c] : out;
            }
        }
        mean_out[r] = mean;
        rstd_out[r] = rstd;
    }
}

/* partial_w / partial_b: (ceil(rows / ROWS_PER_BLOCK), n) scratch; dw / db: (n) outputs. */
void norm_backward(const float *dy, int64_t stride_dy, const float *x, int64_t stride_x, const float *w,
                   const float *mean_in, const float *rstd_in, float *dx, float *partial_w, float *partial_b,
                   float *dw, float *db, int64_t rows, int64_t n, float w_offset, int is_rms, float sigma,
                   uint64_t key, const int64_t *row_ids, int threads) {
    int64_t blocks = (rows + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t block = 0; block < blocks; block++) {
        float *pw = partial_w + block * n;
        float *pb = partial_b ? partial_b + block * n : 0;
        float xhat[CHUNK], noisy[CHUNK];
        memset(pw, 0, n * sizeof(float));
        if (pb) memset(pb, 0, n * sizeof(float));
        int64_t end = (block + 1) * ROWS_PER_BLOCK < rows ? (block + 1) * ROWS_PER_BLOCK : rows;
        for (int64_t r = block * ROWS_PER_BLOCK; r < end; r++) {
            const float *xr = x + r * stride_x, *dyr = dy + r * stride_dy;
            float *dxr = dx + r * n;
            float mean = mean_in[r], rstd = rstd_in[r];
            float dot = 0.0f, total = 0.0f;
            for (int64_t c = 0; c < n; c++) {
                float wdy = dyr[c] * (w[c] + w_offset);
                dot += (xr[c] - mean) * rstd * wdy;
                total += wdy;
            }
            float c1 = dot / n, c2 = is_rms ? 0.0f : total / n;
            for (int64_t start = 0; start < n; start += CHUNK) {
                int64_t count = normalized_chunk(xr, mean, rstd, sigma, key, ROW_ID(r), n, start, xhat, noisy);
                for (int64_t i = 0; i < count; i++) {
                    int64_t c = start + i;
                    float wdy = dyr[c] * (w[c] + w_offset);
                    dxr[c] = (wdy - xhat[i] * c1 - c2) * rstd;
                    pw[c] += dyr[c] * noisy[i];
                    if (pb) pb[c] += dyr[c];
                }
            }
        }
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < n; c++) {
        float sum_w = 0.0f, sum_b = 0.0f;
        for (int64_t block = 0; block < blocks; block++) {
            sum_w += partial_w[block * n + c];
            if (partial_b) sum_b += partial_b[block * n + c];
        }
        dw[c] = sum_w;
        if (db) db[c] = sum_b;
    }
}
