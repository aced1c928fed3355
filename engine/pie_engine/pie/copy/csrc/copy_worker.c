/* A GIL-free KV copy engine for Pie's CPU device (loaded with ctypes by copy_engine_native.py).
 *
 * Why C: a Python copy worker needs the GIL for its own code and for every torch call's return, and each handoff
 * costs the compute thread tens of microseconds. These workers never touch Python, so the compute thread pays only
 * for the submit call and a condvar signal.
 *
 * Two workers, one per direction (0 = "in": host copy -> slot, 1 = "out": slot rows -> host copy), each a FIFO, so
 * completion within a direction is in submission order and a per-direction `completed` counter says exactly which
 * jobs finished: job `seq` (1-based) of direction d is done iff completed[d] >= seq. Prerequisites are such
 * (direction, seq) pairs and may name the other direction, or FENCE: a third counter that the compute thread
 * advances (pie_cw_advance) as layers finish, so a whole step's copies can be queued before the step runs
 * (pie_cw_submit_step). One mutex guards both queues; copies run unlocked.
 */
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { SPAN = 0, ROWS = 1 };
enum { IN = 0, OUT = 1, FENCE = 2 }; /* counters: completed[IN], completed[OUT], fences passed */

typedef struct job {
    struct job *next;
    int kind;
    int pre_dir[2];      /* prerequisites: start once completed[pre_dir[i]] >= pre_seq[i] (seq 0: none) */
    uint64_t pre_seq[2];
    uint64_t min_ns;     /* link model: the job takes at least this long */
    int64_t *result;     /* caller-owned [ns, error]; written before the job counts as completed */
    char *dst[2];        /* SPAN: segments; ROWS: K and V plane bases */
    const char *src[2];
    size_t nbytes[2];    /* SPAN: segment sizes */
    size_t row_bytes, n; /* ROWS: row size, number of rows */
    uint64_t limit;      /* ROWS: rows per plane in both tensors; an index outside is an error, not a wild write */
    int64_t *idx;        /* ROWS: owned copy of the indices (the caller's buffer may die once submit returns) */
} job;

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t work[2];  /* worker d: a job arrived, or the other direction completed one (a prerequisite) */
    pthread_cond_t done;     /* pie_cw_wait callers */
    job *head[2], *tail[2];
    uint64_t submitted[2];
    volatile uint64_t completed[3]; /* [IN, OUT, FENCE]; read lock-free by Python (aligned 64-bit loads); written under mu */
    uint64_t copy_ns[2];
    int stop;
    int blocked[2];           /* worker d is parked on a prerequisite (not merely idle) */
    uint64_t poll_ns, nap_ns; /* idle policy, see worker() */
    pthread_t th[2];
} pie_cw;

typedef struct { pie_cw *cw; int dir; } worker_arg;

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static int prereqs_met(pie_cw *cw, const job *j) {
    for (int i = 0; i < 2; i++)
        if (cw->completed[j->pre_dir[i]] < j->pre_seq[i]) return 0;
    return 1;
}

static int run_copy(const job *j) {
    if (j->kind == SPAN) {
        for (int p = 0; p < 2; p++)
            if (j->nbytes[p]) memcpy(j->dst[p], j->src[p], j->nbytes[p]);
        return 0;
    }
    for (size_t i = 0; i < j->n; i++)
        if (j->idx[i] < 0 || (uint64_t)j->idx[i] >= j->limit) return 1; /* check all before writing any */
    for (int p = 0; p < 2; p++)
        for (size_t i = 0; i < j->n; i++) {
            size_t off = (size_t)j->idx[i] * j->row_bytes;
            memcpy(j->dst[p] + off, j->src[p] + off, j->row_bytes);
        }
    return 0;
}

static void nap(uint64_t ns) {
    if (!ns) { sched_yield(); return; }
    struct timespec ts = {(time_t)(ns / 1000000000u), (long)(ns % 1000000000u)};
    nanosleep(&ts, NULL);
}

static void *worker(void *p) {
    worker_arg a = *(worker_arg *)p;
    free(p);
    pie_cw *cw = a.cw;
    int d = a.dir;
    uint64_t idle_since = now_ns();
    pthread_mutex_lock(&cw->mu);
    for (;;) {
        job *j = cw->head[d];
        /* Drain before stopping: destroy must not drop jobs whose memory the caller still keeps alive for us. */
        if (!j && cw->stop) break;
        if (!j || !prereqs_met(cw, j)) {
            /* Why poll for a while before parking: waking a parked thread is a futex syscall (and, in a VM, an
             * IPI) paid by the submitting compute thread; a polling worker finds the job without it, and
             * pthread_cond_signal with no waiter is a few loads. During a step jobs come every layer. */
            if (now_ns() - idle_since < cw->poll_ns) {
                pthread_mutex_unlock(&cw->mu);
                nap(cw->nap_ns);
                pthread_mutex_lock(&cw->mu);
            } else {
                cw->blocked[d] = j != NULL;
                pthread_cond_wait(&cw->work[d], &cw->mu);
                cw->blocked[d] = 0;
            }
            continue;
        }
        cw->head[d] = j->next;
        if (!cw->head[d]) cw->tail[d] = NULL;
        pthread_mutex_unlock(&cw->mu);

        uint64_t t0 = now_ns();
        int err = run_copy(j);
        uint64_t el = now_ns() - t0;
        if (el < j->min_ns) { /* sleep the rest of the modeled link time */
            uint64_t rest = j->min_ns - el;
            struct timespec ts = {(time_t)(rest / 1000000000u), (long)(rest % 1000000000u)};
            while (nanosleep(&ts, &ts) != 0) {}
            el = now_ns() - t0;
        }
        if (j->result) { j->result[0] = (int64_t)el; j->result[1] = err; }
        free(j->idx);
        free(j);

        pthread_mutex_lock(&cw->mu);
        cw->copy_ns[d] += el;
        cw->completed[d]++;
        idle_since = now_ns();
        /* Wake the other worker only if it waits on a prerequisite: a spurious wake-up of an idle worker would
         * take a vCPU from the compute thread on a small machine. */
        if (cw->blocked[1 - d]) pthread_cond_signal(&cw->work[1 - d]);
        pthread_cond_broadcast(&cw->done);
    }
    pthread_mutex_unlock(&cw->mu);
    return NULL;
}

/* poll_ns: how long an idle worker keeps checking for work (every nap_ns; 0: sched_yield) before parking. */
pie_cw *pie_cw_create(uint64_t poll_ns, uint64_t nap_ns) {
    pie_cw *cw = calloc(1, sizeof *cw);
    if (!cw) return NULL;
    cw->poll_ns = poll_ns;
    cw->nap_ns = nap_ns;
    pthread_mutex_init(&cw->mu, NULL);
    pthread_cond_init(&cw->work[0], NULL);
    pthread_cond_init(&cw->work[1], NULL);
    pthread_cond_init(&cw->done, NULL);
    for (int d = 0; d < 2; d++) {
        worker_arg *a = malloc(sizeof *a);
        if (a) { a->cw = cw; a->dir = d; }
        if (!a || pthread_create(&cw->th[d], NULL, worker, a) != 0) {
            /* Stop the worker already started (if any); the caller falls back to Python threads. */
            free(a);
            pthread_mutex_lock(&cw->mu);
            cw->stop = 1;
            pthread_cond_broadcast(&cw->work[0]);
            pthread_mutex_unlock(&cw->mu);
            if (d == 1) pthread_join(cw->th[0], NULL);
            free(cw);
            return NULL;
        }
    }
    return cw;
}

/* Appends j to direction d's queue; returns its sequence number. */
static uint64_t enqueue(pie_cw *cw, int d, job *j) {
    pthread_mutex_lock(&cw->mu);
    if (cw->tail[d]) cw->tail[d]->next = j; else cw->head[d] = j;
    cw->tail[d] = j;
    uint64_t seq = ++cw->submitted[d];
    pthread_cond_signal(&cw->work[d]);
    pthread_mutex_unlock(&cw->mu);
    return seq;
}

/* Prerequisites are passed as scalars (no arrays to build per call on the Python side). */
static job *new_job(int kind, int pd0, uint64_t ps0, int pd1, uint64_t ps1, uint64_t min_ns, int64_t *result) {
    job *j = calloc(1, sizeof *j);
    if (!j) return NULL;
    j->kind = kind;
    j->pre_dir[0] = pd0 == FENCE ? FENCE : pd0 & 1; j->pre_seq[0] = ps0;
    j->pre_dir[1] = pd1 == FENCE ? FENCE : pd1 & 1; j->pre_seq[1] = ps1;
    j->min_ns = min_ns;
    j->result = result;
    return j;
}

/* Up to 2 memcpy segments (a swap-in: blocks [lo, hi) of K and of V). Returns the seq, 0 if out of memory. */
uint64_t pie_cw_submit_span(pie_cw *cw, int d, void *dst0, const void *src0, size_t n0, void *dst1,
                            const void *src1, size_t n1, int pd0, uint64_t ps0, int pd1, uint64_t ps1, uint64_t min_ns,
                            int64_t *result) {
    job *j = new_job(SPAN, pd0, ps0, pd1, ps1, min_ns, result);
    if (!j) return 0;
    j->dst[0] = dst0; j->src[0] = src0; j->nbytes[0] = n0;
    j->dst[1] = dst1; j->src[1] = src1; j->nbytes[1] = n1;
    return enqueue(cw, d & 1, j);
}

/* Rows idx[0..n) of two planes (a write-back: the step's slot_mapping rows of K and V). */
uint64_t pie_cw_submit_rows(pie_cw *cw, int d, void *dst_k, const void *src_k, void *dst_v, const void *src_v,
                            size_t row_bytes, const int64_t *idx, size_t n, uint64_t limit, int pd0, uint64_t ps0,
                            int pd1, uint64_t ps1, uint64_t min_ns, int64_t *result) {
    job *j = new_job(ROWS, pd0, ps0, pd1, ps1, min_ns, result);
    if (!j) return 0;
    j->idx = malloc(n ? n * sizeof *idx : 1);
    if (!j->idx) { free(j); return 0; }
    if (n) memcpy(j->idx, idx, n * sizeof *idx);
    j->dst[0] = dst_k; j->src[0] = src_k; j->dst[1] = dst_v; j->src[1] = src_v;
    j->row_bytes = row_bytes; j->n = n; j->limit = limit;
    return enqueue(cw, d & 1, j);
}

/* One step's copies in one call. Entry i (10 int64s: write-back host K, slot K, host V, slot V, rows per plane;
 * swap-in slot K, host K, slot V, host V, has_target) is a write-back of rows idx[0..nidx) gated on fence
 * fence_base + i + 1, then, if has_target, a swap-in of span_bytes per plane into the same slot, gated on that
 * write-back. NOTE: the out queue completes in order, so that one prerequisite also covers every earlier
 * write-back, including the target layer's last one (its host copy is current). All or nothing: returns 0 if out
 * of memory (nothing queued), else 1, with the first out and in sequence numbers in seqs[0..2). Job results go to
 * results[4i..4i+2) (write-back) and results[4i+2..4i+4) (swap-in). */
int pie_cw_submit_step(pie_cw *cw, const int64_t *e, size_t n, size_t row_bytes, size_t span_bytes,
                       const int64_t *idx, size_t nidx, uint64_t fence_base, uint64_t min_ns_out,
                       uint64_t min_ns_in, int64_t *results, uint64_t *seqs) {
    job **jobs = calloc(2 * n + 1, sizeof *jobs);
    if (!jobs) return 0;
    int ok = 1;
    for (size_t i = 0; i < n && ok; i++) {
        const int64_t *x = e + 10 * i;
        job *w = new_job(ROWS, FENCE, fence_base + i + 1, 0, 0, min_ns_out, results + 4 * i);
        if (w) w->idx = malloc(nidx ? nidx * sizeof *idx : 1);
        if (!w || !w->idx) { if (w) free(w); ok = 0; break; }
        if (nidx) memcpy(w->idx, idx, nidx * sizeof *idx);
        w->dst[0] = (char *)x[0]; w->src[0] = (const char *)x[1];
        w->dst[1] = (char *)x[2]; w->src[1] = (const char *)x[3];
        w->row_bytes = row_bytes; w->n = nidx; w->limit = (uint64_t)x[4];
        jobs[2 * i] = w;
        if (x[9]) {
            job *r = new_job(SPAN, 0, 0, 0, 0, min_ns_in, results + 4 * i + 2);
            if (!r) { ok = 0; break; }
            r->dst[0] = (char *)x[5]; r->src[0] = (const char *)x[6]; r->nbytes[0] = span_bytes;
            r->dst[1] = (char *)x[7]; r->src[1] = (const char *)x[8]; r->nbytes[1] = span_bytes;
            jobs[2 * i + 1] = r;
        }
    }
    if (!ok) {
        for (size_t i = 0; i < 2 * n; i++)
            if (jobs[i]) { free(jobs[i]->idx); free(jobs[i]); }
        free(jobs);
        return 0;
    }
    pthread_mutex_lock(&cw->mu);
    seqs[0] = cw->submitted[OUT] + 1;
    seqs[1] = cw->submitted[IN] + 1;
    for (size_t i = 0; i < n; i++) {
        job *w = jobs[2 * i], *r = jobs[2 * i + 1];
        if (cw->tail[OUT]) cw->tail[OUT]->next = w; else cw->head[OUT] = w;
        cw->tail[OUT] = w;
        uint64_t wseq = ++cw->submitted[OUT];
        if (r) {
            r->pre_dir[0] = OUT; r->pre_seq[0] = wseq;
            if (cw->tail[IN]) cw->tail[IN]->next = r; else cw->head[IN] = r;
            cw->tail[IN] = r;
            ++cw->submitted[IN];
        }
    }
    pthread_cond_signal(&cw->work[OUT]);
    pthread_cond_signal(&cw->work[IN]);
    pthread_mutex_unlock(&cw->mu);
    free(jobs);
    return 1;
}

/* The compute thread passed fence `value` (and every fence before it): jobs gated on them may start. NOTE: the
 * mutex orders the compute thread's writes to the KV before a worker's reads of it, also on weakly ordered CPUs. */
void pie_cw_advance(pie_cw *cw, uint64_t value) {
    pthread_mutex_lock(&cw->mu);
    if (value > cw->completed[FENCE]) cw->completed[FENCE] = value;
    for (int d = 0; d < 2; d++)
        if (cw->blocked[d]) pthread_cond_signal(&cw->work[d]);
    pthread_mutex_unlock(&cw->mu);
}

/* Blocks until direction d completed `seq` jobs (called through ctypes.CDLL, so without the GIL). */
void pie_cw_wait(pie_cw *cw, int d, uint64_t seq) {
    pthread_mutex_lock(&cw->mu);
    while (cw->completed[d & 1] < seq) pthread_cond_wait(&cw->done, &cw->mu);
    pthread_mutex_unlock(&cw->mu);
}

/* Address of completed[0..3): Python polls it without a call. */
volatile uint64_t *pie_cw_counters(pie_cw *cw) { return cw->completed; }


uint64_t pie_cw_copy_ns(pie_cw *cw, int d) {
    pthread_mutex_lock(&cw->mu);
    uint64_t ns = cw->copy_ns[d & 1];
    pthread_mutex_unlock(&cw->mu);
    return ns;
}

/* Drains both queues, joins the workers, frees the engine. */
void pie_cw_destroy(pie_cw *cw) {
    if (!cw) return;
    pthread_mutex_lock(&cw->mu);
    cw->stop = 1;
    pthread_cond_broadcast(&cw->work[0]);
    pthread_cond_broadcast(&cw->work[1]);
    pthread_mutex_unlock(&cw->mu);
    pthread_join(cw->th[0], NULL);
    pthread_join(cw->th[1], NULL);
    pthread_mutex_destroy(&cw->mu);
    pthread_cond_destroy(&cw->work[0]);
    pthread_cond_destroy(&cw->work[1]);
    pthread_cond_destroy(&cw->done);
    free(cw);
}
