/*
 * policyload: the load-driving core of bench/loadgen.py.
 *
 * Speaks the Postfix policy protocol over N persistent TCP connections with
 * one request outstanding per connection (Postfix never pipelines), using a
 * single-threaded epoll loop.  bench/loadgen.py generates the requests,
 * compiles this file with `cc -O2` into a temporary directory, runs it and
 * turns its output into the report.  It is C because a Python client needs
 * several times more CPU per request than the Twisted server it measures
 * (see the comment at the top of loadgen.py).
 *
 * Input (-f): a pool file written by loadgen.py, all integers little-endian
 * uint32:  "PLP1", n_requests, n_sessions, session_first[n_sessions + 1],
 * request_offset[n_requests + 1], then the request bytes.  A session is a run
 * of requests that one smtpd would send in a row on one connection (one SMTP
 * session: its transactions and their RCPTs).  Each connection takes the next
 * whole session from a shared cursor, so requests of one transaction stay on
 * one connection, as with Postfix.
 *
 * Output: latencies of the requests completed inside the measured window, as
 * native uint64 nanoseconds, to the file named by -o; with -e, when each of
 * them completed (nanoseconds since the window began, same order) to that
 * file; and "key value" lines on stdout (see print_report).
 *
 * Two options serve runs of a server with a helper process (bench/run.py's
 * Redis-backed policyd): -Q PID measures that process's CPU time and
 * run-queue wait over the same window as the server's (companion_cpu_s,
 * companion_wait_s), and -k PID sends it signal -S (SIGKILL by default) at
 * the very moment the measured window begins, so that the window is exactly
 * "the answers after the fault" (signalled_at_s says when, from the start).
 *
 * Paced (open-loop) mode, -r RATE: instead of sending the next request as
 * soon as a reply comes, each connection follows a schedule of its own, RATE
 * requests per second on average, the gaps drawn by -J: "uniform" (the
 * default; uniformly between 0.5 and 1.5 times the mean gap, so that no two
 * requests of a connection are closer than half the mean, as an SMTP client
 * cannot send its next RCPT before the previous answer) or "exp" (exponential
 * gaps: each connection a Poisson process).  The first request of each
 * connection comes at a random phase within one mean gap, so that the
 * connections do not fire together.  The schedule never waits for the server:
 * the next request is due one gap after the previous one was *due*.  Postfix
 * never pipelines, so a request that falls due while the previous reply is
 * still outstanding is sent the moment that reply arrives, and counted as
 * "late" (a server that keeps up has none; one that cannot has its
 * connections fall behind their schedules, sending back to back).  Latency is
 * measured from the moment a request is sent.  The schedule is kept in a
 * binary heap of the idle connections by due time, and one timerfd (armed
 * for an absolute CLOCK_MONOTONIC time, in nanoseconds) wakes the loop for the
 * earliest: sends leave some tens of microseconds after their time on
 * average, instead of bunching into the millisecond ticks of epoll_wait's
 * timeout, which would hand the server several requests per wake-up and
 * understate its cost per request.  The engine's CPU stays low: about 0.05
 * of a core at 1,000 requests a second, 0.17 at 5,000.  -R seeds the
 * generator of the gaps and phases (by default it follows -s).
 *
 * Phases: connect (all N connections, at most 64 connects in flight, no
 * requests sent until all are up or the connect limit passed), warm-up
 * (-w seconds, not measured), measured window (-d seconds, or until -n
 * requests completed, whichever comes first), then every socket is closed and
 * the program exits.  Every run is bounded in time: the connect phase gives up
 * after -T seconds, and the measured window never exceeds -d seconds.
 *
 * Errors are counted as Postfix would see them: timeout (no complete reply
 * within -t ms), closed (EOF or reset while a request was outstanding, or at
 * any other time), malformed (anything but exactly "action=VALUE\n\n" with a
 * non-empty VALUE free of CR and NUL, including bytes the server sent without
 * a request), connect (connect() failed or was refused).  After an error the
 * connection is closed and reopened, as smtpd's attr_clnt would.
 *
 * Loopback only: the host given with -h must be a numeric address; loadgen.py
 * only ever passes 127.0.0.1 or ::1.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <math.h>
#include <time.h>
#include <unistd.h>

#define RECV_CAP 4096
#define MAX_ACTIONS 64
#define ACTION_KEY_LEN 48
#define MAX_CONNECTING 64

enum conn_state { C_CLOSED, C_WAIT_RECONNECT, C_CONNECTING, C_IDLE, C_SENDING, C_WAITING };

struct conn {
    int fd;
    enum conn_state state;
    uint32_t req;      /* current request index */
    uint32_t req_end;  /* one past the last request of the current session */
    uint32_t sent;     /* bytes of the current request written */
    uint32_t rlen;     /* bytes received for the current reply */
    uint64_t t_start;  /* ns: request written (first byte) */
    uint64_t deadline; /* ns: timeout for connect or reply; reconnect time */
    uint64_t due;      /* paced: ns, when the next request is scheduled; 0 not yet */
    int heap_pos;      /* paced: index in the schedule heap, -1 when not in it */
    char rbuf[RECV_CAP];
};

struct action_count {
    char key[ACTION_KEY_LEN];
    uint64_t count;
};

static struct {
    uint32_t n_req, n_sess;
    uint32_t *sess_first;
    uint32_t *req_off;
    const char *data;
} pool;

static struct sockaddr_storage target;
static socklen_t target_len;
static int epfd;
static struct conn *conns;
static int n_conns;
static uint32_t next_session;
static int connecting_now;
static int waiting_reconnect; /* connections in C_WAIT_RECONNECT */

static uint64_t timeout_ns = 10ull * 1000000000ull;
static int measuring;
static uint64_t *lat;
static uint64_t *done_at; /* with -e: completion time of lat[i], ns since the window began */
static int want_done_at;
static uint64_t t_window; /* when the measured window began */
static size_t lat_n, lat_cap;
static uint64_t err_timeout, err_closed, err_malformed, err_connect;
static uint64_t warm_completed;
static struct action_count actions[MAX_ACTIONS];
static int n_actions;
static uint64_t action_other;
static char first_malformed[128];
static volatile sig_atomic_t interrupted;
static uint64_t sessions_started; /* sessions handed out over the whole run */

/* Paced mode (-r): see the top of the file. */
static double pace_mean_ns;  /* mean gap between a connection's requests; 0: saturated */
static int pace_exponential; /* -J exp */
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static struct conn **heap;   /* idle connections waiting for their time, by due */
static int heap_n;
static int timer_fd = -1;
static uint64_t timer_at;    /* the absolute time the timerfd is armed for; 0 none */
static char timer_tag;       /* the timerfd's epoll data.ptr: not a connection */
static uint64_t paced_sent, paced_late, late_lag_max; /* in the measured window */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t cpu_ns(clockid_t clk)
{
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *msg)
{
    fprintf(stderr, "policyload: %s: %s\n", msg, strerror(errno));
    exit(2);
}

/* utime + stime of a process in clock ticks, or -1. */
static long long proc_cpu_ticks(int pid)
{
    char path[64], buf[4096];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* the command name may contain spaces */
    if (!p)
        return -1;
    p += 2; /* field 3 (state) */
    unsigned long long utime = 0, stime = 0;
    /* fields 3..13 skipped, 14 = utime, 15 = stime */
    if (sscanf(p, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &utime, &stime) != 2)
        return -1;
    return (long long)(utime + stime);
}

/* Run-queue wait (ns) summed over all threads of a process, from
   /proc/PID/task/TID/schedstat ("cpu_ns wait_ns slices"): time the threads
   were ready to run but another task held the CPU.  -1 if unavailable.  With
   cpu, also the CPU time of those threads, ns: unlike /proc/PID/stat's clock
   ticks (10 ms) precise enough for a paced window, where a server answering
   1,000 requests a second for 5 s runs for only some 30 ticks.  (Threads that
   ended during the window are missing from it; the servers here run one.) */
static long long proc_sched_ns(int pid, long long *cpu_total)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task", pid);
    DIR *d = opendir(path);
    if (!d)
        return -1;
    long long total = 0, cpu_sum = 0;
    int found = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (de->d_name[0] == '.')
            continue;
        char sp[300];
        snprintf(sp, sizeof sp, "/proc/%d/task/%s/schedstat", pid, de->d_name);
        FILE *f = fopen(sp, "r");
        if (!f)
            continue;
        unsigned long long cpu = 0, wait = 0;
        if (fscanf(f, "%llu %llu", &cpu, &wait) == 2) {
            total += (long long)wait;
            cpu_sum += (long long)cpu;
            found = 1;
        }
        fclose(f);
    }
    closedir(d);
    if (cpu_total)
        *cpu_total = found ? cpu_sum : -1;
    return found ? total : -1;
}

static long long proc_wait_ns(int pid)
{
    return proc_sched_ns(pid, NULL);
}

/* Machine-wide jiffies from /proc/stat's "cpu" line: busy (not idle/iowait) and steal. */
static int machine_ticks(unsigned long long *busy, unsigned long long *steal)
{
    FILE *f = fopen("/proc/stat", "r");
    if (!f)
        return -1;
    unsigned long long v[10] = {0};
    int n = fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2],
                   &v[3], &v[4], &v[5], &v[6], &v[7], &v[8], &v[9]);
    fclose(f);
    if (n < 8)
        return -1;
    /* user nice system idle iowait irq softirq steal guest guest_nice;
       guest time is already included in user. */
    *busy = v[0] + v[1] + v[2] + v[5] + v[6];
    *steal = v[7];
    return 0;
}

static void load_pool(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        die("open pool");
    if (fseek(f, 0, SEEK_END) != 0)
        die("seek pool");
    long size = ftell(f);
    if (size < 12)
        die("pool too small");
    rewind(f);
    char *buf = malloc((size_t)size);
    if (!buf || fread(buf, 1, (size_t)size, f) != (size_t)size)
        die("read pool");
    fclose(f);
    if (memcmp(buf, "PLP1", 4) != 0) {
        errno = EINVAL;
        die("bad pool magic");
    }
    uint32_t *hdr = (uint32_t *)(void *)(buf + 4);
    pool.n_req = hdr[0];
    pool.n_sess = hdr[1];
    size_t head = 12 + 4 * ((size_t)pool.n_sess + 1) + 4 * ((size_t)pool.n_req + 1);
    if (pool.n_req == 0 || pool.n_sess == 0 || head > (size_t)size) {
        errno = EINVAL;
        die("bad pool header");
    }
    pool.sess_first = hdr + 2;
    pool.req_off = pool.sess_first + pool.n_sess + 1;
    pool.data = buf + head;
    if (pool.req_off[pool.n_req] > (size_t)size - head) {
        errno = EINVAL;
        die("bad pool offsets");
    }
}

static void record_action(const char *value, size_t len)
{
    char key[ACTION_KEY_LEN];
    size_t k = 0;
    while (k < len && k < ACTION_KEY_LEN - 1 && value[k] != ' ' && value[k] != '\t') {
        key[k] = (char)toupper((unsigned char)value[k]);
        k++;
    }
    key[k] = 0;
    for (int i = 0; i < n_actions; i++) {
        if (strcmp(actions[i].key, key) == 0) {
            actions[i].count++;
            return;
        }
    }
    if (n_actions < MAX_ACTIONS) {
        memcpy(actions[n_actions].key, key, k + 1);
        actions[n_actions].count = 1;
        n_actions++;
    } else {
        action_other++;
    }
}

static void conn_schedule_reconnect(struct conn *c, uint64_t delay_ns);
static void heap_remove(struct conn *c);

static void conn_close(struct conn *c)
{
    if (c->heap_pos >= 0)
        heap_remove(c);
    if (c->fd >= 0) {
        close(c->fd); /* also removes it from the epoll set */
        c->fd = -1;
    }
    if (c->state == C_CONNECTING)
        connecting_now--;
    c->state = C_CLOSED;
}

static void conn_fail(struct conn *c, uint64_t *counter)
{
    /* Errors count in the measured window only; warm-up errors are reported apart. */
    if (measuring)
        (*counter)++;
    conn_close(c);
    conn_schedule_reconnect(c, counter == &err_connect ? 100000000ull : 0);
}

static void conn_schedule_reconnect(struct conn *c, uint64_t delay_ns)
{
    c->state = C_WAIT_RECONNECT;
    c->deadline = now_ns() + delay_ns;
    waiting_reconnect++;
}

static void conn_start_connect(struct conn *c)
{
    waiting_reconnect--;
    int fd = socket(target.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;
    c->state = C_CONNECTING;
    c->deadline = now_ns() + timeout_ns;
    connecting_now++;
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) != 0)
        die("epoll_ctl add");
    if (connect(fd, (struct sockaddr *)&target, target_len) != 0 && errno != EINPROGRESS) {
        conn_fail(c, &err_connect);
    }
}

static void conn_set_events(struct conn *c, uint32_t events)
{
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) != 0)
        die("epoll_ctl mod");
}

static void conn_write(struct conn *c)
{
    const char *req = pool.data + pool.req_off[c->req];
    uint32_t len = pool.req_off[c->req + 1] - pool.req_off[c->req];
    while (c->sent < len) {
        ssize_t w = send(c->fd, req + c->sent, len - c->sent, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                if (c->state != C_SENDING) {
                    c->state = C_SENDING;
                    conn_set_events(c, EPOLLIN | EPOLLOUT);
                }
                return;
            }
            if (errno == EINTR)
                continue;
            conn_fail(c, &err_closed);
            return;
        }
        c->sent += (uint32_t)w;
    }
    if (c->state == C_SENDING)
        conn_set_events(c, EPOLLIN);
    c->state = C_WAITING;
}

static void conn_send_next(struct conn *c)
{
    if (c->req >= c->req_end) {
        uint32_t s = next_session++ % pool.n_sess;
        sessions_started++;
        c->req = pool.sess_first[s];
        c->req_end = pool.sess_first[s + 1];
    }
    c->sent = 0;
    c->rlen = 0;
    c->t_start = now_ns();
    c->deadline = c->t_start + timeout_ns;
    c->state = C_IDLE;
    conn_write(c);
}

/* xorshift64*: a uniform double in [0, 1). */
static double rng_unit(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (double)((rng_state * 0x2545F4914F6CDD1Dull) >> 11) * 0x1.0p-53;
}

/* The gap from one scheduled request of a connection to its next, ns. */
static uint64_t pace_gap(void)
{
    double u = rng_unit();
    if (pace_exponential)
        return (uint64_t)(-pace_mean_ns * log1p(-u));
    return (uint64_t)(pace_mean_ns * (0.5 + u));
}

static void heap_swap(int i, int j)
{
    struct conn *a = heap[i];
    heap[i] = heap[j];
    heap[j] = a;
    heap[i]->heap_pos = i;
    heap[j]->heap_pos = j;
}

static void heap_up(int i)
{
    while (i > 0 && heap[(i - 1) / 2]->due > heap[i]->due) {
        heap_swap(i, (i - 1) / 2);
        i = (i - 1) / 2;
    }
}

static void heap_down(int i)
{
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < heap_n && heap[l]->due < heap[m]->due)
            m = l;
        if (r < heap_n && heap[r]->due < heap[m]->due)
            m = r;
        if (m == i)
            return;
        heap_swap(i, m);
        i = m;
    }
}

static void heap_push(struct conn *c)
{
    heap[heap_n] = c;
    c->heap_pos = heap_n++;
    heap_up(c->heap_pos);
}

static void heap_remove(struct conn *c)
{
    int i = c->heap_pos;
    c->heap_pos = -1;
    if (--heap_n == i)
        return;
    heap[i] = heap[heap_n];
    heap[i]->heap_pos = i;
    heap_up(i);
    heap_down(heap[i]->heap_pos);
}

/* Send a paced connection's due request now; its next falls due one gap later. */
static void paced_send(struct conn *c)
{
    if (measuring)
        paced_sent++;
    c->due += pace_gap();
    conn_send_next(c);
}

/* A connection is free to send (connected, or its reply came at time t):
   saturated, it sends at once; paced, it sends if its request is due (late if
   it fell due while a reply was outstanding) or waits in the heap for it. */
static void conn_go(struct conn *c, uint64_t t, int after_reply)
{
    if (pace_mean_ns <= 0) {
        conn_send_next(c);
        return;
    }
    if (!c->due)
        c->due = t + (uint64_t)(rng_unit() * pace_mean_ns); /* a random phase */
    if (c->due > t) {
        c->state = C_IDLE;
        heap_push(c);
        return;
    }
    if (after_reply && measuring) {
        paced_late++;
        if (t - c->due > late_lag_max)
            late_lag_max = t - c->due;
    }
    paced_send(c);
}

/* Send every request that is due; arm the timerfd for the next one. */
static void paced_run_due(void)
{
    uint64_t t = now_ns();
    while (heap_n && heap[0]->due <= t) {
        struct conn *c = heap[0];
        heap_remove(c);
        paced_send(c);
    }
    if (heap_n && heap[0]->due != timer_at) {
        struct itimerspec its = {0};
        timer_at = heap[0]->due;
        its.it_value.tv_sec = (time_t)(timer_at / 1000000000ull);
        its.it_value.tv_nsec = (long)(timer_at % 1000000000ull);
        if (timerfd_settime(timer_fd, TFD_TIMER_ABSTIME, &its, NULL) != 0)
            die("timerfd_settime");
    }
}

static void note_malformed(const struct conn *c)
{
    if (first_malformed[0] || !measuring)
        return;
    size_t j = 0;
    for (uint32_t i = 0; i < c->rlen && j < sizeof first_malformed - 5; i++) {
        unsigned char ch = (unsigned char)c->rbuf[i];
        if (ch == '\n') {
            first_malformed[j++] = '\\';
            first_malformed[j++] = 'n';
        } else if (ch < 0x20 || ch >= 0x7f || ch == '\\') {
            j += (size_t)snprintf(first_malformed + j, sizeof first_malformed - j, "\\x%02x", ch);
        } else {
            first_malformed[j++] = (char)ch;
        }
    }
    first_malformed[j] = 0;
}

/* Returns 1 if the reply is complete and valid, 0 if more bytes are needed, -1 if malformed. */
static int check_reply(const struct conn *c)
{
    const char *b = c->rbuf;
    uint32_t n = c->rlen;
    const char *nl = memchr(b, '\n', n);
    if (!nl)
        return n >= RECV_CAP ? -1 : 0;
    size_t first = (size_t)(nl - b);
    if (first + 1 >= n)
        return 0; /* need the byte after the first LF */
    if (b[first + 1] != '\n')
        return -1; /* a second attribute line: not exactly one action */
    if (first + 2 != n)
        return -1; /* bytes after the reply: unsolicited data */
    if (first < 8 || memcmp(b, "action=", 7) != 0)
        return -1; /* no action or an empty value */
    for (size_t i = 7; i < first; i++)
        if (b[i] == '\r' || b[i] == 0)
            return -1;
    return 1;
}

static void conn_readable(struct conn *c, uint64_t *completed, uint64_t t_end_count, int *count_done)
{
    for (;;) {
        if (c->rlen >= RECV_CAP) {
            note_malformed(c);
            conn_fail(c, &err_malformed);
            return;
        }
        ssize_t r = recv(c->fd, c->rbuf + c->rlen, RECV_CAP - c->rlen, 0);
        if (r < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            if (errno == EINTR)
                continue;
            conn_fail(c, &err_closed);
            return;
        }
        if (r == 0) {
            conn_fail(c, &err_closed);
            return;
        }
        if (c->state != C_WAITING) {
            /* The server spoke without a request, or before it had the whole request. */
            c->rlen += (uint32_t)r;
            note_malformed(c);
            conn_fail(c, &err_malformed);
            return;
        }
        c->rlen += (uint32_t)r;
        int ok = check_reply(c);
        if (ok == 0)
            continue;
        if (ok < 0) {
            note_malformed(c);
            conn_fail(c, &err_malformed);
            return;
        }
        uint64_t t = now_ns();
        if (measuring) {
            if (lat_n == lat_cap) {
                lat_cap = lat_cap ? lat_cap * 2 : 1 << 20;
                lat = realloc(lat, lat_cap * sizeof *lat);
                if (!lat)
                    die("realloc");
                if (want_done_at) {
                    done_at = realloc(done_at, lat_cap * sizeof *done_at);
                    if (!done_at)
                        die("realloc");
                }
            }
            if (want_done_at)
                done_at[lat_n] = t - t_window;
            lat[lat_n++] = t - c->t_start;
            record_action(c->rbuf + 7, c->rlen - 9);
            (*completed)++;
            if (t_end_count && *completed >= t_end_count) {
                *count_done = 1;
                c->state = C_IDLE;
                c->req++;
                return;
            }
        } else {
            warm_completed++;
        }
        c->req++;
        conn_go(c, t, 1);
        return;
    }
}

static void on_signal(int sig)
{
    (void)sig;
    interrupted = 1;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: policyload -h ADDR -p PORT -f POOL -o LATFILE [-c CONNS] [-w WARMUP_S]\n"
            "                  [-d DURATION_S] [-n COUNT] [-t TIMEOUT_MS] [-T CONNECT_S]\n"
            "                  [-P SERVER_PID] [-s START_SESSION] [-e DONEFILE]\n"
            "                  [-Q COMPANION_PID] [-k SIGNAL_PID [-S SIGNUM]]\n"
            "                  [-r RATE_PER_CONN [-J uniform|exp] [-R SEED]]\n");
    exit(2);
}

static void print_report(double window_s, uint64_t completed, int connected, int count_done,
                         uint64_t own_cpu, uint64_t own_cpu_total, long long srv_ticks,
                         long ticks_per_s, unsigned long long m_busy, unsigned long long m_steal,
                         double connect_s)
{
    printf("connections %d\n", n_conns);
    printf("connected %d\n", connected);
    printf("connect_s %.6f\n", connect_s);
    printf("window_s %.6f\n", window_s);
    printf("completed %llu\n", (unsigned long long)completed);
    printf("count_reached %d\n", count_done);
    printf("warmup_completed %llu\n", (unsigned long long)warm_completed);
    printf("err_timeout %llu\n", (unsigned long long)err_timeout);
    printf("err_closed %llu\n", (unsigned long long)err_closed);
    printf("err_malformed %llu\n", (unsigned long long)err_malformed);
    printf("err_connect %llu\n", (unsigned long long)err_connect);
    printf("own_cpu_s %.6f\n", (double)own_cpu / 1e9);
    printf("own_cpu_total_s %.6f\n", (double)own_cpu_total / 1e9);
    printf("server_cpu_s %.6f\n", srv_ticks < 0 ? -1.0 : (double)srv_ticks / (double)ticks_per_s);
    printf("machine_busy_s %.6f\n", (double)m_busy / (double)ticks_per_s);
    printf("machine_steal_s %.6f\n", (double)m_steal / (double)ticks_per_s);
    printf("interrupted %d\n", (int)interrupted);
    printf("sessions_started %llu\n", (unsigned long long)sessions_started);
    if (pace_mean_ns > 0) {
        printf("paced_sent %llu\n", (unsigned long long)paced_sent);
        printf("paced_late %llu\n", (unsigned long long)paced_late);
        printf("late_lag_max_s %.6f\n", (double)late_lag_max / 1e9);
    }
    if (first_malformed[0])
        printf("first_malformed %s\n", first_malformed);
    for (int i = 0; i < n_actions; i++)
        printf("action %llu %s\n", (unsigned long long)actions[i].count, actions[i].key);
    if (action_other)
        printf("action %llu (other)\n", (unsigned long long)action_other);
}

int main(int argc, char **argv)
{
    const char *host = NULL, *pool_path = NULL, *lat_path = NULL, *done_path = NULL;
    int port = 0, server_pid = 0, companion_pid = 0, signal_pid = 0, signum = SIGKILL, opt;
    double warmup_s = 1.0, duration_s = 10.0, connect_limit_s = 30.0;
    unsigned long long count = 0;
    double rate = 0.0;
    const char *jitter = "uniform";
    int seeded = 0;
    n_conns = 1;
    while ((opt = getopt(argc, argv, "h:p:f:o:c:w:d:n:t:T:P:s:e:Q:k:S:r:J:R:")) != -1) {
        switch (opt) {
        case 'h': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'f': pool_path = optarg; break;
        case 'o': lat_path = optarg; break;
        case 'c': n_conns = atoi(optarg); break;
        case 'w': warmup_s = atof(optarg); break;
        case 'd': duration_s = atof(optarg); break;
        case 'n': count = strtoull(optarg, NULL, 10); break;
        case 't': timeout_ns = strtoull(optarg, NULL, 10) * 1000000ull; break;
        case 'T': connect_limit_s = atof(optarg); break;
        case 'P': server_pid = atoi(optarg); break;
        case 's': next_session = (uint32_t)strtoul(optarg, NULL, 10); break;
        case 'e': done_path = optarg; break;
        case 'Q': companion_pid = atoi(optarg); break;
        case 'k': signal_pid = atoi(optarg); break;
        case 'S': signum = atoi(optarg); break;
        case 'r': rate = atof(optarg); break;
        case 'J': jitter = optarg; break;
        case 'R':
            rng_state = strtoull(optarg, NULL, 10) * 0x9E3779B97F4A7C15ull + 1;
            seeded = 1;
            break;
        default: usage();
        }
    }
    if (!host || !pool_path || !lat_path || port <= 0 || port > 65535 || n_conns < 1 ||
        duration_s <= 0 || warmup_s < 0 || timeout_ns == 0 || companion_pid < 0 ||
        signal_pid < 0 || signum <= 0 || rate < 0 ||
        (strcmp(jitter, "uniform") != 0 && strcmp(jitter, "exp") != 0))
        usage();
    if (rate > 0) {
        pace_mean_ns = 1e9 / rate;
        pace_exponential = strcmp(jitter, "exp") == 0;
        if (!seeded)
            rng_state ^= (uint64_t)next_session * 0x9E3779B97F4A7C15ull;
        for (int i = 0; i < 8; i++)
            rng_unit();
    }
    want_done_at = done_path != NULL;

    memset(&target, 0, sizeof target);
    struct sockaddr_in *sin = (struct sockaddr_in *)&target;
    struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&target;
    if (inet_pton(AF_INET, host, &sin->sin_addr) == 1) {
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)port);
        target_len = sizeof *sin;
    } else if (inet_pton(AF_INET6, host, &sin6->sin6_addr) == 1) {
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons((uint16_t)port);
        target_len = sizeof *sin6;
    } else {
        fprintf(stderr, "policyload: -h must be a numeric address\n");
        return 2;
    }

    load_pool(pool_path);
    signal(SIGPIPE, SIG_IGN);
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    long ticks_per_s = sysconf(_SC_CLK_TCK);

    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        die("epoll_create1");
    conns = calloc((size_t)n_conns, sizeof *conns);
    if (!conns)
        die("calloc");
    for (int i = 0; i < n_conns; i++) {
        conns[i].fd = -1;
        conns[i].state = C_WAIT_RECONNECT;
        conns[i].deadline = 0;
        conns[i].heap_pos = -1;
    }
    waiting_reconnect = n_conns;
    if (count) {
        lat_cap = (size_t)count;
        lat = malloc(lat_cap * sizeof *lat);
        if (!lat)
            die("malloc");
        if (want_done_at) {
            done_at = malloc(lat_cap * sizeof *done_at);
            if (!done_at)
                die("malloc");
        }
    }

    struct epoll_event *evs = calloc((size_t)n_conns + 1, sizeof *evs);
    if (!evs)
        die("calloc");
    if (pace_mean_ns > 0) {
        heap = calloc((size_t)n_conns, sizeof *heap);
        if (!heap)
            die("calloc");
        timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
        if (timer_fd < 0)
            die("timerfd_create");
        struct epoll_event tev = {.events = EPOLLIN, .data.ptr = &timer_tag};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, timer_fd, &tev) != 0)
            die("epoll_ctl add timerfd");
    }

    /* Phase 0: connect everything (bounded), then warm up, then measure. */
    enum { P_CONNECT, P_WARMUP, P_MEASURE, P_DONE } phase = P_CONNECT;
    uint64_t t0 = now_ns();
    uint64_t phase_end = t0 + (uint64_t)(connect_limit_s * 1e9);
    uint64_t t_measure = 0, t_stop = 0, connect_ns = 0;
    uint64_t own0 = 0, own1 = 0;
    long long srv0 = -1, srv1 = -1, srvw0 = -1, srvw1 = -1, ownw0 = -1, ownw1 = -1;
    long long srvc0 = -1, srvc1 = -1;
    long long cmp0 = -1, cmp1 = -1, cmpw0 = -1, cmpw1 = -1;
    int signal_errno = -1;
    uint64_t t_signal = 0;
    unsigned long long mb0 = 0, ms0 = 0, mb1 = 0, ms1 = 0;
    uint64_t completed = 0;
    int count_done = 0;
    uint64_t last_scan = 0;

    while (phase != P_DONE && !interrupted) {
        uint64_t t = now_ns();
        /* Start connects: all connections wanting one, at most MAX_CONNECTING at a time. */
        for (int i = 0; waiting_reconnect && i < n_conns && connecting_now < MAX_CONNECTING; i++) {
            struct conn *c = &conns[i];
            if (c->state == C_WAIT_RECONNECT && c->deadline <= t)
                conn_start_connect(c);
        }
        if (phase == P_CONNECT) {
            int up = 0;
            for (int i = 0; i < n_conns; i++)
                up += conns[i].state >= C_IDLE;
            if (up == n_conns || t >= phase_end) {
                connect_ns = t - t0;
                phase = P_WARMUP;
                phase_end = t + (uint64_t)(warmup_s * 1e9);
                for (int i = 0; i < n_conns; i++)
                    if (conns[i].state == C_IDLE)
                        conn_go(&conns[i], t, 0);
            }
        }
        if (phase == P_WARMUP && t >= phase_end) {
            phase = P_MEASURE;
            measuring = 1;
            own0 = cpu_ns(CLOCK_PROCESS_CPUTIME_ID);
            srv0 = server_pid ? proc_cpu_ticks(server_pid) : -1;
            srvw0 = server_pid ? proc_sched_ns(server_pid, &srvc0) : -1;
            ownw0 = proc_wait_ns(getpid());
            machine_ticks(&mb0, &ms0);
            cmp0 = companion_pid ? proc_cpu_ticks(companion_pid) : -1;
            cmpw0 = companion_pid ? proc_wait_ns(companion_pid) : -1;
            t_measure = now_ns();
            t_window = t_measure;
            if (signal_pid) {
                t_signal = now_ns();
                signal_errno = kill(signal_pid, signum) == 0 ? 0 : errno;
            }
            phase_end = t_measure + (uint64_t)(duration_s * 1e9);
            t = t_measure;
        }
        if (phase == P_MEASURE && (t >= phase_end || count_done)) {
            own1 = cpu_ns(CLOCK_PROCESS_CPUTIME_ID);
            srv1 = server_pid ? proc_cpu_ticks(server_pid) : -1;
            srvw1 = server_pid ? proc_sched_ns(server_pid, &srvc1) : -1;
            ownw1 = proc_wait_ns(getpid());
            machine_ticks(&mb1, &ms1);
            cmp1 = companion_pid ? proc_cpu_ticks(companion_pid) : -1;
            cmpw1 = companion_pid ? proc_wait_ns(companion_pid) : -1;
            t_stop = now_ns();
            measuring = 0;
            phase = P_DONE;
            break;
        }
        /* Timeouts, scanned every 10 ms: O(connections), cheap next to the I/O. */
        if (t - last_scan >= 10000000ull) {
            last_scan = t;
            for (int i = 0; i < n_conns; i++) {
                struct conn *c = &conns[i];
                if ((c->state == C_CONNECTING || c->state == C_WAITING || c->state == C_SENDING) &&
                    c->deadline <= t)
                    conn_fail(c, c->state == C_CONNECTING ? &err_connect : &err_timeout);
            }
        }
        if (pace_mean_ns > 0)
            paced_run_due();
        int n = epoll_wait(epfd, evs, n_conns + 1, 5);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n && !count_done; i++) {
            if (evs[i].data.ptr == &timer_tag) {
                uint64_t expirations;
                if (read(timer_fd, &expirations, sizeof expirations) < 0 && errno != EAGAIN)
                    die("read timerfd");
                timer_at = 0; /* fired: arm again for whatever is next */
                continue;
            }
            struct conn *c = evs[i].data.ptr;
            uint32_t e = evs[i].events;
            if (c->fd < 0)
                continue;
            if (c->state == C_CONNECTING) {
                int err = 0;
                socklen_t el = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
                if (err || (e & (EPOLLERR | EPOLLHUP))) {
                    conn_fail(c, &err_connect);
                    continue;
                }
                connecting_now--;
                c->state = C_IDLE;
                conn_set_events(c, EPOLLIN);
                /* While the others still connect, stay quiet: a server busy answering
                   requests accepts slowly, its backlog (Twisted's default is 50)
                   overflows and every dropped SYN costs a 1 s retransmit. */
                if (phase != P_CONNECT)
                    /* Resumes the session; a failed request is sent again, as smtpd
                       retries (paced: when it is due). */
                    conn_go(c, now_ns(), 0);
                continue;
            }
            if (e & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
                conn_readable(c, &completed, count, &count_done);
                if (c->state == C_CLOSED || c->state == C_WAIT_RECONNECT)
                    continue;
            }
            if ((e & EPOLLOUT) && c->state == C_SENDING)
                conn_write(c);
        }
    }
    if (phase != P_DONE) { /* interrupted */
        own1 = cpu_ns(CLOCK_PROCESS_CPUTIME_ID);
        srv1 = server_pid ? proc_cpu_ticks(server_pid) : -1;
        srvw1 = server_pid ? proc_sched_ns(server_pid, &srvc1) : -1;
        ownw1 = proc_wait_ns(getpid());
        machine_ticks(&mb1, &ms1);
        t_stop = now_ns();
        if (!t_measure) {
            t_measure = t_stop;
            own0 = own1;
            srv0 = srv1;
            srvw0 = srvw1;
            srvc0 = srvc1;
            ownw0 = ownw1;
            mb0 = mb1;
            ms0 = ms1;
        }
    }
    int connected = 0;
    for (int i = 0; i < n_conns; i++) {
        connected += conns[i].state >= C_IDLE;
        conn_close(&conns[i]);
    }

    FILE *lf = fopen(lat_path, "wb");
    if (!lf)
        die("open latency file");
    if (lat_n && fwrite(lat, sizeof *lat, lat_n, lf) != lat_n)
        die("write latency file");
    if (fclose(lf) != 0)
        die("close latency file");
    if (done_path) {
        FILE *df = fopen(done_path, "wb");
        if (!df)
            die("open completion-time file");
        if (lat_n && fwrite(done_at, sizeof *done_at, lat_n, df) != lat_n)
            die("write completion-time file");
        if (fclose(df) != 0)
            die("close completion-time file");
    }

    print_report((double)(t_stop - t_measure) / 1e9, completed, connected, count_done, own1 - own0,
                 cpu_ns(CLOCK_PROCESS_CPUTIME_ID),
                 (srv0 >= 0 && srv1 >= 0) ? srv1 - srv0 : -1, ticks_per_s, mb1 - mb0, ms1 - ms0,
                 (double)connect_ns / 1e9);
    if (srvw0 >= 0 && srvw1 >= 0)
        printf("server_wait_s %.6f\n", (double)(srvw1 - srvw0) / 1e9);
    if (srvc0 >= 0 && srvc1 >= 0)
        printf("server_sched_cpu_s %.6f\n", (double)(srvc1 - srvc0) / 1e9);
    if (ownw0 >= 0 && ownw1 >= 0)
        printf("own_wait_s %.6f\n", (double)(ownw1 - ownw0) / 1e9);
    if (cmp0 >= 0 && cmp1 >= 0)
        printf("companion_cpu_s %.6f\n", (double)(cmp1 - cmp0) / (double)ticks_per_s);
    if (cmpw0 >= 0 && cmpw1 >= 0)
        printf("companion_wait_s %.6f\n", (double)(cmpw1 - cmpw0) / 1e9);
    if (signal_pid) {
        printf("signal_errno %d\n", signal_errno);
        if (t_signal)
            printf("signalled_at_s %.6f\n", (double)(t_signal - t0) / 1e9);
    }
    return interrupted ? 130 : 0;
}
