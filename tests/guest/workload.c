/*
 * pmigrate test-guest workload ("pmw").
 *
 * Runs inside the test guest (started by /init in the initramfs) and keeps a
 * working set of 4 KiB pages whose every byte is verifiable, so that a live
 * migration that loses, tears, duplicates or misplaces a page is detected.
 *
 * Parameters come from the kernel command line (/proc/cmdline):
 *   pmw.mb=<MiB>        working-set size (default 64)
 *   pmw.rate=<MiB/s>    rate at which pages are rewritten; 0 = idle: fill
 *                       once, then only verify (default 0)
 *   pmw.hot=<percent>   share of writes that go to the hot 20 % of pages
 *                       (default 80)
 *   pmw.verify=<MiB/s>  speed of the background sequential verification
 *                       sweep (default 16)
 *   pmw.seed=<n>        salt mixed into page contents (default 1)
 *   pmw.inject=<secs>   self-test: <secs> after "PMW ready", damage three
 *                       pages on purpose (a stale page, a torn page, a page
 *                       with another page's contents); the checker must then
 *                       report exactly those 3 as PMW CORRUPT (default 0=off)
 *
 * Page layout (4096 bytes, 512 u64 words):
 *   word 0  magic  PMW_MAGIC
 *   word 1  page index
 *   word 2  generation (starts at 1, +1 on every rewrite)
 *   word 3  checksum of the body
 *   words 4..511  body: PRNG stream seeded from (seed, index, generation)
 *
 * The expected generation of every page lives in a SEPARATE array.  The
 * program is single-threaded, so at any verification point every page must
 * be exactly {magic, index, expected generation, body(index, generation)}:
 *   - a stale page (old contents) shows generation < expected  -> "stale"
 *   - a stale generation array shows generation > expected     -> "ahead"
 *   - a page from another index shows the wrong index / body   -> "index"
 *   - a torn page shows header and body disagreeing            -> "body"/"csum"
 * Every page is verified right before it is rewritten, by random spot checks
 * (same skew as the writes) and by a continuous sequential sweep.
 * A detected corruption is reported once and the page is rewritten with a
 * fresh generation so that the same damage is not counted again.
 *
 * Console output (stdout, which /init points at /dev/console = ttyS0):
 *   PMW start mb=.. pages=.. rate=.. hot=.. verify=.. seed=..
 *   PMW ready fill_ms=..
 *   PMW ok t=<secs> gen=<total writes> verified=<pages verified> errors=0
 *     (at least once per second; the tag is "PMW err" instead of "PMW ok"
 *      once errors is nonzero)
 *   PMW CORRUPT page=<n> kind=<k> ...   on every detected corruption
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE_SIZE 4096u
#define PAGE_WORDS (PAGE_SIZE / 8u)
#define HDR_WORDS 4u
#define PMW_MAGIC 0x504d57706167650aULL /* "PMWpage\n" */

#define SLICE_NS 10000000LL      /* 10 ms pacing slice */
#define MAX_CATCHUP_NS 100000000LL /* never make up more than 100 ms of work */
#define WORK_BUDGET_NS 50000000LL  /* at most ~50 ms of writing per iteration */
#define MAX_CORRUPT_LINES_PER_SEC 50

static uint64_t seed_salt = 1;
static uint64_t npages;
static uint64_t *mem;  /* working set, npages * PAGE_WORDS words */
static uint64_t *gens; /* expected generation per page (separate array) */

static uint64_t total_writes;   /* pages rewritten since start (fill excluded) */
static uint64_t total_verified; /* pages verified since start */
static uint64_t errors;         /* corruptions detected */
static uint64_t corrupt_lines_this_sec;
static uint64_t corrupt_suppressed;

/* ------------------------------------------------------------------ output */

static void out(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n >= sizeof buf)
        n = sizeof buf - 1;
    const char *p = buf;
    while (n > 0) {
        ssize_t w = write(1, p, (size_t)n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        p += w;
        n -= (int)w;
    }
}

/* ------------------------------------------------------------------- time */

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void sleep_until(int64_t t_ns)
{
    struct timespec ts = {.tv_sec = t_ns / 1000000000LL, .tv_nsec = t_ns % 1000000000LL};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

/* -------------------------------------------------------------------- rng */

static inline uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ULL;

static inline uint64_t rng_next(void)
{
    /* xorshift64* */
    uint64_t x = rng_state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng_state = x;
    return x * 0x2545f4914f6cdd1dULL;
}

static inline uint64_t rng_below(uint64_t n)
{
    return (uint64_t)(((unsigned __int128)rng_next() * n) >> 64);
}

/* ------------------------------------------------------------- page content */

static inline uint64_t body_seed(uint64_t index, uint64_t gen)
{
    return mix64(seed_salt ^ mix64(index * 0x9e3779b97f4a7c15ULL + 0x632be59bd9b4e019ULL) ^
                 (gen * 0xd1b54a32d192ed03ULL));
}

/* body word i = x_i where x_{i} = x_{i-1} * A + B (LCG, cheap), mixed with a
 * cheap xorshift so neighbouring words differ in all bits. */
#define BODY_A 6364136223846793005ULL
#define BODY_B 1442695040888963407ULL

static inline uint64_t body_word(uint64_t x)
{
    return x ^ (x >> 29);
}

static inline uint64_t csum_step(uint64_t c, uint64_t w)
{
    return ((c << 7) | (c >> 57)) ^ w;
}

static void write_page(uint64_t index, uint64_t gen)
{
    uint64_t *p = mem + index * PAGE_WORDS;
    uint64_t x = body_seed(index, gen);
    uint64_t c = 0x243f6a8885a308d3ULL;
    for (unsigned i = HDR_WORDS; i < PAGE_WORDS; i++) {
        x = x * BODY_A + BODY_B;
        uint64_t w = body_word(x);
        p[i] = w;
        c = csum_step(c, w);
    }
    p[0] = PMW_MAGIC;
    p[1] = index;
    p[2] = gen;
    p[3] = c;
    gens[index] = gen;
}

static void report_corrupt(uint64_t index, const char *kind, uint64_t want_gen, const uint64_t *p,
                           int bad_word, uint64_t want_word)
{
    errors++;
    if (corrupt_lines_this_sec >= MAX_CORRUPT_LINES_PER_SEC) {
        corrupt_suppressed++;
        return;
    }
    corrupt_lines_this_sec++;
    out("PMW CORRUPT page=%llu kind=%s want_gen=%llu got_magic=%#llx got_index=%llu got_gen=%llu "
        "word=%d got=%#llx want=%#llx errors=%llu\n",
        (unsigned long long)index, kind, (unsigned long long)want_gen, (unsigned long long)p[0],
        (unsigned long long)p[1], (unsigned long long)p[2], bad_word,
        bad_word >= 0 ? (unsigned long long)p[bad_word] : 0ULL, (unsigned long long)want_word,
        (unsigned long long)errors);
}

/* Returns 1 if the page is intact.  On corruption: report and rewrite. */
static int verify_page(uint64_t index)
{
    const uint64_t *p = mem + index * PAGE_WORDS;
    uint64_t want_gen = gens[index];
    total_verified++;

    const char *kind = NULL;
    int bad_word = -1;
    uint64_t want_word = 0;

    if (p[0] != PMW_MAGIC) {
        kind = "magic";
        bad_word = 0;
        want_word = PMW_MAGIC;
    } else if (p[1] != index) {
        kind = "index";
        bad_word = 1;
        want_word = index;
    } else if (p[2] < want_gen) {
        kind = "stale";
        bad_word = 2;
        want_word = want_gen;
    } else if (p[2] > want_gen) {
        kind = "ahead";
        bad_word = 2;
        want_word = want_gen;
    } else {
        uint64_t x = body_seed(index, want_gen);
        uint64_t c = 0x243f6a8885a308d3ULL;
        for (unsigned i = HDR_WORDS; i < PAGE_WORDS; i++) {
            x = x * BODY_A + BODY_B;
            uint64_t w = body_word(x);
            if (p[i] != w) {
                kind = "body";
                bad_word = (int)i;
                want_word = w;
                break;
            }
            c = csum_step(c, w);
        }
        if (!kind && p[3] != c) {
            kind = "csum";
            bad_word = 3;
            want_word = c;
        }
    }
    if (!kind)
        return 1;
    report_corrupt(index, kind, want_gen, p, bad_word, want_word);
    /* Resynchronise so the same damage is reported once only. */
    uint64_t g = (p[2] > want_gen ? p[2] : want_gen) + 1;
    write_page(index, g);
    return 0;
}

/* ------------------------------------------------------------- parameters */

static uint64_t param(const char *cmdline, const char *name, uint64_t dflt)
{
    size_t nl = strlen(name);
    const char *s = cmdline;
    while ((s = strstr(s, name)) != NULL) {
        int at_word_start = (s == cmdline) || s[-1] == ' ' || s[-1] == '\t';
        if (at_word_start && s[nl] == '=') {
            char *end;
            unsigned long long v = strtoull(s + nl + 1, &end, 0);
            if (end != s + nl + 1)
                return (uint64_t)v;
        }
        s += nl;
    }
    return dflt;
}

static void read_cmdline(char *buf, size_t len)
{
    buf[0] = 0;
    int fd = open("/proc/cmdline", O_RDONLY);
    if (fd < 0)
        return;
    ssize_t n = read(fd, buf, len - 1);
    close(fd);
    if (n < 0)
        n = 0;
    buf[n] = 0;
    for (ssize_t i = 0; i < n; i++)
        if (buf[i] == '\n')
            buf[i] = ' ';
}

static void *alloc(size_t bytes)
{
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE,
                   -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

/* Self-test of the checker: simulate what a broken migration would do. */
static void inject_damage(void)
{
    if (npages < 4) {
        out("PMW inject skipped (need >= 4 pages)\n");
        return;
    }
    static uint64_t saved[PAGE_WORDS];
    uint64_t a = npages / 3, b = npages / 2, c = npages - 2;
    /* stale: the page reverts to its previous generation */
    memcpy(saved, mem + a * PAGE_WORDS, PAGE_SIZE);
    write_page(a, gens[a] + 1);
    memcpy(mem + a * PAGE_WORDS, saved, PAGE_SIZE);
    /* torn: second half of the page is from the previous generation */
    memcpy(saved, mem + b * PAGE_WORDS, PAGE_SIZE);
    write_page(b, gens[b] + 1);
    memcpy(mem + b * PAGE_WORDS + PAGE_WORDS / 2, saved + PAGE_WORDS / 2, PAGE_SIZE / 2);
    /* misplaced: page c holds page c+1's contents */
    memcpy(mem + c * PAGE_WORDS, mem + (c + 1) * PAGE_WORDS, PAGE_SIZE);
    out("PMW inject pages=%llu,%llu,%llu\n", (unsigned long long)a, (unsigned long long)b,
        (unsigned long long)c);
}

static void idle_forever(void)
{
    for (;;)
        pause();
}

/* ------------------------------------------------------------------- main */

int main(int argc, char **argv)
{
    char cmdline[4096];
    read_cmdline(cmdline, sizeof cmdline);
    /* argv may override the command line, e.g. `workload pmw.mb=8` (host testing). */
    for (int i = 1; i < argc; i++) {
        size_t cl = strlen(cmdline);
        snprintf(cmdline + cl, sizeof cmdline - cl, " %s", argv[i]);
    }

    uint64_t mb = param(cmdline, "pmw.mb", 64);
    uint64_t rate = param(cmdline, "pmw.rate", 0);
    uint64_t hot_pct = param(cmdline, "pmw.hot", 80);
    uint64_t verify_mbps = param(cmdline, "pmw.verify", 16);
    seed_salt = param(cmdline, "pmw.seed", 1);
    uint64_t inject_s = param(cmdline, "pmw.inject", 0);
    if (hot_pct > 100)
        hot_pct = 100;
    if (mb == 0)
        mb = 1;

    npages = mb * (1024 * 1024 / PAGE_SIZE);
    out("PMW start mb=%llu pages=%llu rate=%llu hot=%llu verify=%llu seed=%llu\n",
        (unsigned long long)mb, (unsigned long long)npages, (unsigned long long)rate,
        (unsigned long long)hot_pct, (unsigned long long)verify_mbps,
        (unsigned long long)seed_salt);

    mem = alloc(npages * PAGE_SIZE);
    gens = alloc(npages * sizeof(uint64_t));
    if (!mem || !gens) {
        out("PMW FATAL cannot allocate %llu MiB: %s\n", (unsigned long long)mb, strerror(errno));
        idle_forever();
    }
    mlock(mem, npages * PAGE_SIZE); /* best effort: there is no swap anyway */

    int64_t t0 = now_ns();
    for (uint64_t i = 0; i < npages; i++)
        write_page(i, 1);
    int64_t t_ready = now_ns();
    out("PMW ready fill_ms=%lld\n", (long long)((t_ready - t0) / 1000000));

    rng_state ^= mix64((uint64_t)t_ready ^ seed_salt);
    if (rng_state == 0)
        rng_state = 1;

    uint64_t hot_n = npages / 5;
    if (hot_n == 0)
        hot_n = 1;
    uint64_t cold_n = npages - hot_n;

    /* Work budgets in pages per second. */
    double write_pps = (double)rate * (1024.0 * 1024.0 / PAGE_SIZE);
    double sweep_pps = (double)verify_mbps * (1024.0 * 1024.0 / PAGE_SIZE);
    double write_credit = 0, sweep_credit = 0;
    uint64_t sweep_cursor = 0;

    int64_t start = now_ns();
    int64_t last = start;
    int64_t next_slice = start + SLICE_NS;
    int64_t next_beat = start; /* first heartbeat immediately */

    for (;;) {
        int64_t now = now_ns();
        int64_t dt = now - last;
        if (dt < 0)
            dt = 0;
        if (dt > MAX_CATCHUP_NS)
            dt = MAX_CATCHUP_NS; /* clock jump (e.g. after migration): don't binge */
        last = now;

        write_credit += write_pps * (double)dt / 1e9;
        sweep_credit += sweep_pps * (double)dt / 1e9;
        double max_w = write_pps * (double)MAX_CATCHUP_NS / 1e9 + 1;
        double max_s = sweep_pps * (double)MAX_CATCHUP_NS / 1e9 + 1;
        if (write_credit > max_w)
            write_credit = max_w;
        if (sweep_credit > max_s)
            sweep_credit = max_s;

        /* Rewrites, skewed: hot_pct % of writes go to the first 20 % of pages.
         * Work per iteration is bounded in time too, so heartbeats keep
         * coming when the target rate is more than the CPU can do. */
        int64_t iter_start = now;
        unsigned n_done = 0;
        while (write_credit >= 1.0) {
            if ((++n_done & 63) == 0 && now_ns() - iter_start > WORK_BUDGET_NS) {
                write_credit = 0;
                break;
            }
            write_credit -= 1.0;
            uint64_t idx;
            if (cold_n == 0 || rng_below(100) < hot_pct)
                idx = rng_below(hot_n);
            else
                idx = hot_n + rng_below(cold_n);
            /* Check the old contents first: a stale page that is about to be
             * overwritten would otherwise go unnoticed. */
            verify_page(idx);
            write_page(idx, gens[idx] + 1);
            total_writes++;
        }

        /* Random spot checks with the same skew as the writes. */
        for (int k = 0; k < 8; k++) {
            uint64_t idx;
            if (cold_n == 0 || rng_below(100) < hot_pct)
                idx = rng_below(hot_n);
            else
                idx = hot_n + rng_below(cold_n);
            verify_page(idx);
        }

        /* Continuous sequential sweep: every page is verified periodically. */
        n_done = 0;
        while (sweep_credit >= 1.0) {
            if ((++n_done & 63) == 0 && now_ns() - iter_start > 2 * WORK_BUDGET_NS) {
                sweep_credit = 0;
                break;
            }
            sweep_credit -= 1.0;
            verify_page(sweep_cursor);
            if (++sweep_cursor == npages)
                sweep_cursor = 0;
        }

        now = now_ns();
        if (inject_s && now - start >= (int64_t)inject_s * 1000000000LL) {
            inject_s = 0;
            inject_damage();
        }
        if (now >= next_beat) {
            if (corrupt_suppressed) {
                out("PMW CORRUPT suppressed=%llu (rate-limited)\n",
                    (unsigned long long)corrupt_suppressed);
                corrupt_suppressed = 0;
            }
            corrupt_lines_this_sec = 0;
            int64_t t = now - start;
            out("PMW %s t=%lld.%03lld gen=%llu verified=%llu errors=%llu\n",
                errors ? "err" : "ok", (long long)(t / 1000000000LL),
                (long long)((t / 1000000LL) % 1000), (unsigned long long)total_writes,
                (unsigned long long)total_verified, (unsigned long long)errors);
            next_beat += 1000000000LL;
            if (next_beat <= now)
                next_beat = now + 1000000000LL; /* after a jump, don't burst beats */
        }

        if (next_slice > now) {
            sleep_until(next_slice);
            next_slice += SLICE_NS;
        } else {
            /* Behind schedule (slow CPU, clock jump): resynchronise. */
            next_slice = now + SLICE_NS;
        }
    }
}
