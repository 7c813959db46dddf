/*
 * loadgen.c -- closed-loop TCP ping-pong load generator for bench/echo.py.
 *
 * usage: loadgen PORT [CONNS [SIZE [SECONDS [WARMUP [FRAMING]]]]]
 *        (defaults: 100 connections, 64 bytes, 5 s measured, 1 s warm-up, raw)
 *
 * Opens CONNS connections to 127.0.0.1:PORT (TCP_NODELAY, non-blocking). Each
 * connection sends SIZE bytes, waits for the complete SIZE-byte echo (checked
 * byte for byte), records the round-trip time and sends again: at most one
 * message in flight per connection. One thread, level-triggered epoll, one
 * recv() per readable event, so the generator costs about one send, one recv
 * and a share of an epoll_wait per round trip.
 *
 * FRAMING is "raw" (any SIZE bytes) or "len4": each SIZE-byte request is then one
 * packet for a server framing with a 4-byte big-endian length header (such as
 * examples/framed_echo.py --packet 4): the header holds SIZE-4 and SIZE-4 payload
 * bytes follow (SIZE >= 4). Such a server strips the header on receive and adds
 * it back on send, so the echo is again the same SIZE bytes and is checked the
 * same way.
 *
 * Round trips completing during the first WARMUP seconds are not counted; those
 * completing in the following SECONDS are. The send time is taken just before
 * send(); the receive time is the moment epoll_wait returned the batch the
 * reply was in, so the loadgen's own work on other connections of the same
 * batch is not charged to the server. Latencies go into a histogram of 1 us
 * buckets (up to ~1 s; slower ones share an overflow bucket that reports the
 * maximum seen).
 *
 * Prints one line on stdout:
 *     msgs_s=<round trips/s> p50_us=<..> p99_us=<..> p999_us=<..> lg_cpu=<..>%
 * where lg_cpu is this process's CPU time (user + system) over the measured
 * wall time: near 100% means the generator, not the server, is the limit.
 *
 * Exit status: 0 ok; 1 bad usage or setup failure; 2 a connection failed
 * (closed, reset or wrong echo); 3 no round trip completed while measuring.
 * Diagnostics go to stderr.
 *
 * Built with -DLOADGEN_TLS (and -lssl -lcrypto) it is bench/tls.py's TLS load generator:
 * the same closed loop, the echo read and written through SSL_read/SSL_write.  Each
 * connection does its handshake (TLS 1.3 if the server offers it, the certificate not
 * verified: a benchmark on loopback) before the clock starts, so what is measured is the
 * record layer.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifdef LOADGEN_TLS
#include <openssl/err.h>
#include <openssl/ssl.h>
#endif

#define HIST_BUCKETS (1u << 20) /* 1 us each: 0 .. ~1.05 s; index HIST_BUCKETS = overflow */
#define MAX_EVENTS 512

typedef struct {
    int fd;
#ifdef LOADGEN_TLS
    SSL *ssl;
#endif
    int idx;
    size_t sent;     /* bytes of the current message written so far */
    size_t got;      /* bytes of its echo read so far */
    uint64_t t0_ns;  /* when the current message started going out */
    int want_out;    /* EPOLLOUT currently registered (a send was short) */
} conn_t;

static int ep = -1;
static size_t msg_size;
static unsigned char *msg;      /* the payload every connection sends */
static unsigned char *rbufs;    /* one SIZE-byte receive buffer per connection */
static uint32_t *hist;
static uint64_t hist_max_us;
static uint64_t completed;      /* round trips completed while measuring */
static int measuring;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6
         + (double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static void fail_setup(const char *what) {
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void fail_conn(const conn_t *c, const char *what) {
    fprintf(stderr, "loadgen: connection %d: %s\n", c->idx, what);
    exit(2);
}

static void set_events(conn_t *c, int want_out) {
    struct epoll_event ev = {.events = EPOLLIN | (want_out ? EPOLLOUT : 0), .data.ptr = c};
    if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) < 0) fail_setup("epoll_ctl(MOD)");
    c->want_out = want_out;
}

/* Write as much of the pending message as the socket takes. */
static void do_write(conn_t *c) {
    while (c->sent < msg_size) {
#ifdef LOADGEN_TLS
        int n = SSL_write(c->ssl, msg + c->sent, (int)(msg_size - c->sent));
        if (n > 0) {
            c->sent += (size_t)n;
            continue;
        }
        int err = SSL_get_error(c->ssl, n);
        if (err == SSL_ERROR_WANT_WRITE || err == SSL_ERROR_WANT_READ) {
            if (!c->want_out) set_events(c, 1);
            return;
        }
        fail_conn(c, ERR_reason_error_string(ERR_get_error()));
#else
        ssize_t n = send(c->fd, msg + c->sent, msg_size - c->sent, MSG_NOSIGNAL);
        if (n > 0) {
            c->sent += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (!c->want_out) set_events(c, 1);
            return;
        } else {
            fail_conn(c, n < 0 ? strerror(errno) : "send returned 0");
        }
#endif
    }
    if (c->want_out) set_events(c, 0);
}

static void start_message(conn_t *c) {
    c->sent = 0;
    c->got = 0;
    c->t0_ns = now_ns();
    do_write(c);
}

static void record(uint64_t rtt_ns) {
    uint64_t us = rtt_ns / 1000u;
    if (us > hist_max_us) hist_max_us = us;
    hist[us < HIST_BUCKETS ? us : HIST_BUCKETS]++;
    completed++;
}

/* One recv per readable event (level-triggered: leftovers are reported again). */
static void do_read(conn_t *c, uint64_t t_wake) {
    unsigned char *rbuf = rbufs + (size_t)c->idx * msg_size;
#ifdef LOADGEN_TLS
    /* Read while OpenSSL holds decrypted bytes: epoll cannot report those. */
    for (;;) {
        int n = SSL_read(c->ssl, rbuf + c->got, (int)(msg_size - c->got));
        if (n <= 0) {
            int err = SSL_get_error(c->ssl, n);
            if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) return;
            if (err == SSL_ERROR_ZERO_RETURN) fail_conn(c, "closed by the server");
            fail_conn(c, "SSL_read failed");
        }
        c->got += (size_t)n;
        if (c->got == msg_size || SSL_pending(c->ssl) == 0) break;
    }
#else
    ssize_t n = recv(c->fd, rbuf + c->got, msg_size - c->got, 0);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
        fail_conn(c, strerror(errno));
    }
    if (n == 0) fail_conn(c, "closed by the server");
    c->got += (size_t)n;
#endif
    if (c->got < msg_size) return;
    if (memcmp(rbuf, msg, msg_size) != 0) fail_conn(c, "echo differs from what was sent");
    if (measuring) record(t_wake > c->t0_ns ? t_wake - c->t0_ns : 0);
    start_message(c);
}

static uint64_t percentile_us(double q) {
    if (completed == 0) return 0;
    double rank = q * (double)completed; /* nearest rank: the ceil(q * n)-th smallest */
    uint64_t target = (uint64_t)rank;
    if ((double)target < rank) target++;
    if (target < 1) target = 1;
    if (target > completed) target = completed;
    uint64_t seen = 0;
    for (uint32_t i = 0; i < HIST_BUCKETS; i++) {
        seen += hist[i];
        if (seen >= target) return i;
    }
    return hist_max_us; /* in the overflow bucket */
}

static long parse_long(const char *s, const char *name, long lo, long hi) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || v < lo || v > hi) {
        fprintf(stderr, "loadgen: bad %s '%s' (want %ld..%ld)\n", name, s, lo, hi);
        exit(1);
    }
    return v;
}

static double parse_seconds(const char *s, const char *name, double lo) {
    char *end;
    double v = strtod(s, &end);
    if (*end || !(v >= lo) || v > 86400) {
        fprintf(stderr, "loadgen: bad %s '%s'\n", name, s);
        exit(1);
    }
    return v;
}

int main(int argc, char **argv) {
    if (argc < 2 || argc > 7) {
        fprintf(stderr, "usage: %s PORT [CONNS [SIZE [SECONDS [WARMUP [raw|len4]]]]]\n",
                argv[0]);
        return 1;
    }
    int port = (int)parse_long(argv[1], "PORT", 1, 65535);
    int nconns = argc > 2 ? (int)parse_long(argv[2], "CONNS", 1, 1000000) : 100;
    msg_size = argc > 3 ? (size_t)parse_long(argv[3], "SIZE", 1, 64L << 20) : 64;
    double seconds = argc > 4 ? parse_seconds(argv[4], "SECONDS", 0.001) : 5.0;
    double warmup = argc > 5 ? parse_seconds(argv[5], "WARMUP", 0.0) : 1.0;
    const char *framing = argc > 6 ? argv[6] : "raw";
    int len4 = strcmp(framing, "len4") == 0;
    if (!len4 && strcmp(framing, "raw") != 0) {
        fprintf(stderr, "loadgen: bad FRAMING '%s' (want raw or len4)\n", framing);
        return 1;
    }
    if (len4 && (msg_size < 4 || msg_size - 4 > UINT32_MAX)) {
        fprintf(stderr, "loadgen: FRAMING len4 needs SIZE >= 4 (a 4-byte header + payload)\n");
        return 1;
    }

    /* Allow many connections: raise the descriptor limit as far as permitted. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    msg = malloc(msg_size);
    rbufs = malloc(msg_size * (size_t)nconns);
    hist = calloc(HIST_BUCKETS + 1, sizeof *hist);
    conn_t *conns = calloc((size_t)nconns, sizeof *conns);
    if (!msg || !rbufs || !hist || !conns) fail_setup("out of memory");
    for (size_t i = 0; i < msg_size; i++) msg[i] = (unsigned char)('a' + i % 26);
    if (len4) { /* a 4-byte big-endian header holding the payload size, SIZE - 4 */
        uint32_t payload = htonl((uint32_t)(msg_size - 4));
        memcpy(msg, &payload, 4);
    }

#ifdef LOADGEN_TLS
    if (len4) {
        fprintf(stderr, "loadgen: FRAMING len4 is not built into the TLS load generator\n");
        return 1;
    }
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx) fail_setup("SSL_CTX_new");
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
#endif

    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) fail_setup("epoll_create1");

    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    for (int i = 0; i < nconns; i++) {
        conn_t *c = &conns[i];
        c->idx = i;
        c->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (c->fd < 0) fail_setup("socket");
        int one = 1;
        if (setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0)
            fail_setup("setsockopt(TCP_NODELAY)");
        /* Blocking connect (the server is already listening), then non-blocking I/O. */
        if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0) fail_setup("connect");
#ifdef LOADGEN_TLS
        /* A blocking handshake, before the clock starts. */
        c->ssl = SSL_new(ctx);
        if (!c->ssl || SSL_set_fd(c->ssl, c->fd) != 1) fail_setup("SSL_new");
        if (SSL_connect(c->ssl) != 1) {
            fprintf(stderr, "loadgen: connection %d: TLS handshake failed: %s\n", i,
                    ERR_reason_error_string(ERR_get_error()));
            exit(2);
        }
#endif
        if (fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK) < 0) fail_setup("fcntl");
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) fail_setup("epoll_ctl(ADD)");
    }

    uint64_t t_start = now_ns();
    uint64_t t_measure = t_start + (uint64_t)(warmup * 1e9);
    uint64_t t_end = t_measure + (uint64_t)(seconds * 1e9);
    double cpu0 = 0.0;
    if (warmup <= 0.0) {
        measuring = 1;
        cpu0 = cpu_seconds();
    }

    for (int i = 0; i < nconns; i++) start_message(&conns[i]);

    struct epoll_event evs[MAX_EVENTS];
    uint64_t now = t_start;
    for (;;) {
        now = now_ns();
        if (!measuring && now >= t_measure) {
            measuring = 1;
            t_measure = now;
            t_end = now + (uint64_t)(seconds * 1e9);
            cpu0 = cpu_seconds();
        }
        if (now >= t_end) break;
        uint64_t deadline = measuring ? t_end : t_measure;
        int timeout_ms = (int)((deadline - now) / 1000000u) + 1;
        int n = epoll_wait(ep, evs, MAX_EVENTS, timeout_ms);
        if (n < 0) {
            if (errno == EINTR) continue;
            fail_setup("epoll_wait");
        }
        uint64_t t_wake = now_ns();
        for (int i = 0; i < n; i++) {
            conn_t *c = evs[i].data.ptr;
            uint32_t e = evs[i].events;
            if (e & EPOLLOUT) do_write(c);
            if (e & (EPOLLIN | EPOLLERR | EPOLLHUP)) do_read(c, t_wake);
        }
    }
    double cpu1 = cpu_seconds();
    double wall = (double)(now - t_measure) / 1e9;
    if (wall <= 0) wall = 1e-9;

    printf("msgs_s=%.0f p50_us=%llu p99_us=%llu p999_us=%llu lg_cpu=%.1f%%\n",
           (double)completed / wall,
           (unsigned long long)percentile_us(0.50),
           (unsigned long long)percentile_us(0.99),
           (unsigned long long)percentile_us(0.999),
           100.0 * (cpu1 - cpu0) / wall);
    fflush(stdout);
    if (completed == 0) {
        fprintf(stderr, "loadgen: no round trip completed in the measured %.1f s\n", wall);
        return 3;
    }
    return 0;
}
