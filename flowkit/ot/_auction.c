/*
 * flowkit.ot._auction: Bertsekas' auction algorithm for the dense square assignment problem,
 * one bid at a time (Gauss-Seidel), with epsilon-scaling. CPU only; built when a C compiler
 * is present at install time (setup.py marks the extension optional), otherwise flowkit
 * uses its pure-torch solvers.
 *
 * Problem: minimise sum_i C[i, pi(i)] over permutations pi of {0..n-1}.
 *
 * Prices p_j are added to the costs. Row i ("person") is in epsilon-complementary slackness
 * (eps-CS) with its column pi(i) when
 *
 *     C[i, pi(i)] + p[pi(i)] <= min_j (C[i, j] + p[j]) + eps.                     (1)
 *
 * An unassigned person i bids for its best column j1 = argmin_j C[i,j] + p[j] (value b1,
 * second-best value b2), raising p[j1] by (b2 - b1) + eps and displacing j1's holder; the
 * bidder is then in eps-CS. A phase ends when everybody holds a column; a complete
 * assignment in eps-CS costs at most optimum + n*eps (Bertsekas 1988, Prop. 1). Phases run
 * with eps shrinking by `theta` and keep their prices (Bertsekas & Eckstein 1988), which
 * bounds the number of bids per phase; the last phase uses eps_final.
 *
 * References:
 *   Bertsekas (1988). The auction algorithm: a distributed relaxation method for the
 *   assignment problem. Annals of Operations Research 14, 105-123.
 *   Bertsekas & Eckstein (1988). Dual coordinate step methods for linear network flow
 *   problems. Mathematical Programming 42, 203-243.
 *
 * Why sequential C: the bids of one phase depend on each other through the prices, so a
 * vectorised (Jacobi) auction in torch pays a dozen kernel launches per round for thousands
 * of rounds. One bid here is a single pass over a row that sits in L1 cache.
 *
 * The Python entry point takes raw addresses of contiguous CPU tensors; flowkit.ot.compiled
 * checks dtype, shape, device and contiguity before calling it and keeps the tensors alive.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/*
 * best_two: the best (smallest) and second-best value of row[j] + price[j] over j, and the
 * first column attaining the best; n >= 2. This pass is the whole cost of a bid. The AVX2
 * version (picked at import where the CPU has it; elsewhere the scalar loop runs) keeps a
 * running minimum and second minimum per lane,
 *
 *     second <- min(second, max(best, v)),   best <- min(best, v),
 *
 * merges the lanes, then finds the column by an equality search (the same additions, so the
 * same rounding). Costs are finite, so min/max need no NaN handling.
 */
typedef void (*best_two_fn)(Py_ssize_t, const double *, const double *, Py_ssize_t *, double *,
                            double *);

static void best_two_scalar(Py_ssize_t n, const double *row, const double *price,
                            Py_ssize_t *best_col, double *best, double *second) {
    double b1 = INFINITY, b2 = INFINITY;
    Py_ssize_t j1 = 0;
    for (Py_ssize_t j = 0; j < n; j++) {
        double v = row[j] + price[j];
        if (v < b1) {
            b2 = b1;
            b1 = v;
            j1 = j;
        } else if (v < b2) {
            b2 = v;
        }
    }
    *best_col = j1;
    *best = b1;
    *second = b2;
}

/* Merge per-lane (best, second) pairs and the scalar tail [j, n) into the overall pair. */
static inline void merge_lanes(const double *lane_best, const double *lane_second, int lanes,
                               Py_ssize_t j, Py_ssize_t n, const double *row, const double *price,
                               double *best, double *second) {
    double b1 = INFINITY, b2 = INFINITY;
    for (int l = 0; l < lanes; l++) {
        double v = lane_best[l];
        if (v < b1) {
            b2 = b1 < b2 ? b1 : b2;
            b1 = v;
        } else if (v < b2) {
            b2 = v;
        }
        if (lane_second[l] < b2) b2 = lane_second[l];
    }
    for (; j < n; j++) {
        double v = row[j] + price[j];
        if (v < b1) {
            b2 = b1;
            b1 = v;
        } else if (v < b2) {
            b2 = v;
        }
    }
    *best = b1;
    *second = b2;
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_X86_SIMD 1

__attribute__((target("avx2"))) static void best_two_avx2(Py_ssize_t n, const double *row,
                                                          const double *price,
                                                          Py_ssize_t *best_col, double *best,
                                                          double *second) {
    __m256d best_a = _mm256_set1_pd(INFINITY), second_a = best_a, best_b = best_a,
            second_b = best_a;
    Py_ssize_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256d v = _mm256_add_pd(_mm256_loadu_pd(row + j), _mm256_loadu_pd(price + j));
        __m256d w = _mm256_add_pd(_mm256_loadu_pd(row + j + 4), _mm256_loadu_pd(price + j + 4));
        second_a = _mm256_min_pd(second_a, _mm256_max_pd(best_a, v));
        best_a = _mm256_min_pd(best_a, v);
        second_b = _mm256_min_pd(second_b, _mm256_max_pd(best_b, w));
        best_b = _mm256_min_pd(best_b, w);
    }
    double lane_best[8], lane_second[8];
    _mm256_storeu_pd(lane_best, best_a);
    _mm256_storeu_pd(lane_best + 4, best_b);
    _mm256_storeu_pd(lane_second, second_a);
    _mm256_storeu_pd(lane_second + 4, second_b);
    merge_lanes(lane_best, lane_second, 8, j, n, row, price, best, second);
    __m256d target = _mm256_set1_pd(*best);
    Py_ssize_t k = 0;
    for (; k + 4 <= n; k += 4) {
        __m256d v = _mm256_add_pd(_mm256_loadu_pd(row + k), _mm256_loadu_pd(price + k));
        int hit = _mm256_movemask_pd(_mm256_cmp_pd(v, target, _CMP_EQ_OQ));
        if (hit) {
            *best_col = k + __builtin_ctz((unsigned)hit);
            return;
        }
    }
    while (row[k] + price[k] != *best) k++;
    *best_col = k;
}
#endif

static best_two_fn best_two = best_two_scalar;
static const char *best_two_name = "scalar";

static void choose_best_two(void) {
#ifdef HAVE_X86_SIMD
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) {
        best_two = best_two_avx2;
        best_two_name = "avx2";
    }
#endif
}

/* Returns the number of bids, or -1 when out of memory. row_col[i] = column of row i. */
static long long auction(Py_ssize_t n, const double *cost, int64_t *row_col, double *price,
                         double eps_start, double eps_final, double theta) {
    int64_t *col_row = malloc(sizeof(int64_t) * (size_t)n);
    Py_ssize_t *queue = malloc(sizeof(Py_ssize_t) * (size_t)n);
    if (col_row == NULL || queue == NULL) {
        free(col_row);
        free(queue);
        return -1;
    }
    long long bids = 0;
    double eps = eps_start > eps_final ? eps_start : eps_final;
    for (;;) {
        /* a phase: everybody unassigned, prices kept from the previous phase */
        for (Py_ssize_t j = 0; j < n; j++) col_row[j] = -1;
        for (Py_ssize_t i = 0; i < n; i++) {
            row_col[i] = -1;
            queue[i] = i;
        }
        Py_ssize_t head = 0, waiting = n;
        while (waiting > 0) {
            Py_ssize_t i = queue[head];
            head = head + 1 == n ? 0 : head + 1;
            waiting--;
            Py_ssize_t j1;
            double b1, b2;
            best_two(n, cost + i * n, price, &j1, &b1, &b2);
            price[j1] += (b2 - b1) + eps;
            bids++;
            int64_t displaced = col_row[j1];
            col_row[j1] = i;
            row_col[i] = j1;
            if (displaced >= 0) {
                row_col[displaced] = -1;
                Py_ssize_t tail = head + waiting;
                queue[tail >= n ? tail - n : tail] = (Py_ssize_t)displaced;
                waiting++;
            }
        }
        if (eps <= eps_final) break;
        eps /= theta;
        if (eps < eps_final) eps = eps_final;
    }
    free(col_row);
    free(queue);
    return bids;
}

static PyObject *py_auction(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t n;
    unsigned long long cost_addr, out_addr, price_addr;
    double eps_start, eps_final, theta;
    if (!PyArg_ParseTuple(args, "nKKKddd", &n, &cost_addr, &out_addr, &price_addr, &eps_start,
                          &eps_final, &theta))
        return NULL;
    if (n < 2) {
        PyErr_SetString(PyExc_ValueError, "auction: need n >= 2");
        return NULL;
    }
    if (!(eps_final > 0.0) || !(theta > 1.0) || !isfinite(eps_start) || !isfinite(eps_final)) {
        PyErr_SetString(PyExc_ValueError, "auction: need finite eps_final > 0 and theta > 1");
        return NULL;
    }
    long long bids;
    Py_BEGIN_ALLOW_THREADS
    bids = auction(n, (const double *)(uintptr_t)cost_addr, (int64_t *)(uintptr_t)out_addr,
                   (double *)(uintptr_t)price_addr, eps_start, eps_final, theta);
    Py_END_ALLOW_THREADS
    if (bids < 0) return PyErr_NoMemory();
    return PyLong_FromLongLong(bids);
}

/* use_kernel(name) -> previous name: pick the best_two kernel (tests run every one). */
static PyObject *py_use_kernel(PyObject *self, PyObject *args) {
    PyObject *module = self;
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    const char *previous = best_two_name;
    if (strcmp(name, "scalar") == 0) {
        best_two = best_two_scalar;
        best_two_name = "scalar";
#ifdef HAVE_X86_SIMD
    } else if (strcmp(name, "avx2") == 0 && __builtin_cpu_supports("avx2")) {
        best_two = best_two_avx2;
        best_two_name = "avx2";
#endif
    } else {
        PyErr_Format(PyExc_ValueError, "kernel %s is not available here", name);
        return NULL;
    }
    PyObject *current = PyUnicode_FromString(best_two_name);
    if (current == NULL) return NULL;
    int failed = PyObject_SetAttrString(module, "kernel", current);
    Py_DECREF(current);
    if (failed < 0) return NULL;
    return PyUnicode_FromString(previous);
}

static PyMethodDef methods[] = {
    {"use_kernel", py_use_kernel, METH_VARARGS,
     "use_kernel(name) -> previous: 'scalar' or 'avx2' (where available)."},
    {"auction", py_auction, METH_VARARGS,
     "auction(n, cost_address, out_address, price_address, eps_start, eps_final, theta) -> bids\n\n"
     "Minimum-cost assignment of a contiguous float64 [n, n] cost (row-major) into a\n"
     "contiguous int64 [n] output; prices (float64 [n], in/out) start the first phase.\n"
     "Use flowkit.ot.optimal_assignment, which checks its arguments."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_auction",
    "Sequential epsilon-scaling auction for dense assignment (see flowkit.ot).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__auction(void) {
    choose_best_two();
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddStringConstant(m, "kernel", best_two_name) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
