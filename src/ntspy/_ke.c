/*
 * ntspy._ke: the NTS-KE server's connection handling (TCP accept, TLS 1.3,
 * reading one request, writing one answer) in C, for `server/ke_server.py`.
 *
 * Why: with asyncio transports and pyOpenSSL, Python code around the TLS
 * work was about half of a key exchange's CPU time (docs/performance.md).
 * Here one engine per listening socket keeps its own epoll set (the
 * listening socket, every connection, a timerfd for the deadlines and an
 * eventfd to stop it) and its own thread, which waits in epoll_wait without
 * the GIL and takes it only to handle what is ready; asyncio's event loop is
 * not involved (its wake-ups were 5-8% of a key exchange).  Python still
 * decides everything that is NTS: for each connection C calls back
 *
 *   on_accept(host, same) -> bool   admit or drop (counters, caps, ntsratelimit);
 *                                   ``same``: connections open now from the
 *                                   same client (IPv4 address, IPv6 /64)
 *   on_request(data, eof) -> bytes  the KE request bytes -> the answer
 *                                   (parsing and negotiation stay in Python,
 *                                   which may call Engine.export()/peer())
 *   on_failed(who, kind, detail)    a connection that ended without an answer
 *
 * so every accepted connection ends in exactly one on_request or on_failed.
 *
 * TLS is the system OpenSSL (libssl), configured as net/tls/credentials.py configures
 * pyOpenSSL for the pure-Python path: TLS 1.3 only, ALPN "ntske/1" required,
 * no session tickets, X25519 preferred, certificate chosen by SNI.  The module
 * is optional: without it (or with NTSPY_NO_ACCEL=1) the asyncio path serves.
 *
 * The callbacks run on the engine's thread.  All engine state is touched only
 * with the GIL held; close() (from another thread) wakes the engine's thread
 * through the eventfd and joins it before it frees anything.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>

#include <pthread.h>
#include <signal.h>

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#define ALPN_NTSKE "\x07ntske/1"
#define ALPN_NTSKE_LEN 8
/* RFC 8915 leaves the size open; proto/ke.py refuses more than this. */
#define MAX_MESSAGE 65536
#define READ_CHUNK 16384
#define ACCEPTS_PER_RUN 64
#define EVENTS_PER_RUN 64
/* As net/tls/credentials.py: the cheapest first (X25519; AES-128-GCM with SHA-256). */
#define GROUPS "X25519:P-256:P-384"
#define SUITES "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"

enum { P_HANDSHAKE = 0, P_REQUEST = 1, P_CLOSING = 2 };

static double
monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* OpenSSL's reason strings for the errors queued on this thread, "; "-joined;
 * the queue is emptied. */
static PyObject *
ssl_reasons(void)
{
    char text[512];
    size_t used = 0;
    unsigned long code;
    text[0] = '\0';
    while ((code = ERR_get_error()) != 0) {
        const char *reason = ERR_reason_error_string(code);
        char fallback[32];
        if (reason == NULL) {
            snprintf(fallback, sizeof fallback, "error %d", ERR_GET_REASON(code));
            reason = fallback;
        }
        if (used + strlen(reason) + 3 < sizeof text) {
            used += (size_t)snprintf(text + used, sizeof text - used, "%s%s",
                                     used ? "; " : "", reason);
        }
    }
    return PyUnicode_FromString(used ? text : "unknown TLS error");
}

/* ------------------------------------------------------------------------ */
/* TlsContext: the certificate/key pairs, one SSL_CTX each, first = default */

typedef struct {
    PyObject_HEAD
    int count;
    SSL_CTX **ctx;
    X509 **leaf;
} TlsContextObject;

static int
select_alpn(SSL *ssl, const unsigned char **out, unsigned char *outlen,
            const unsigned char *in, unsigned int inlen, void *arg);
static int select_certificate(SSL *ssl, int *alert, void *arg);

static void
TlsContext_dealloc(TlsContextObject *self)
{
    for (int i = 0; i < self->count; i++) {
        SSL_CTX_free(self->ctx[i]);
        X509_free(self->leaf[i]);
    }
    PyMem_Free(self->ctx);
    PyMem_Free(self->leaf);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static SSL_CTX *
load_pair(const char *chain, Py_ssize_t chain_len, const char *key, Py_ssize_t key_len,
          X509 **leaf_out)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    BIO *bio = NULL;
    X509 *cert = NULL;
    EVP_PKEY *pkey = NULL;
    if (ctx == NULL)
        goto fail;
    if (!SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION))
        goto fail;
    /* NTS-KE clients never resume: no tickets, no cache (see net/tls/credentials.py). */
    SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_num_tickets(ctx, 0);
    if (!SSL_CTX_set1_groups_list(ctx, GROUPS) || !SSL_CTX_set_ciphersuites(ctx, SUITES))
        goto fail;
    SSL_CTX_set_options(ctx, SSL_OP_CIPHER_SERVER_PREFERENCE);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    SSL_CTX_set_alpn_select_cb(ctx, select_alpn, NULL);

    bio = BIO_new_mem_buf(chain, (int)chain_len);
    if (bio == NULL || (cert = PEM_read_bio_X509(bio, NULL, NULL, NULL)) == NULL)
        goto fail;
    if (!SSL_CTX_use_certificate(ctx, cert))
        goto fail;
    for (;;) {
        X509 *extra = PEM_read_bio_X509(bio, NULL, NULL, NULL);
        if (extra == NULL)
            break;
        if (!SSL_CTX_add0_chain_cert(ctx, extra)) {
            X509_free(extra);
            goto fail;
        }
    }
    ERR_clear_error(); /* the end of the PEM data */
    BIO_free(bio);
    bio = BIO_new_mem_buf(key, (int)key_len);
    if (bio == NULL || (pkey = PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL)) == NULL)
        goto fail;
    if (!SSL_CTX_use_PrivateKey(ctx, pkey) || !SSL_CTX_check_private_key(ctx))
        goto fail;
    EVP_PKEY_free(pkey);
    BIO_free(bio);
    *leaf_out = cert;
    return ctx;
fail:
    EVP_PKEY_free(pkey);
    X509_free(cert);
    BIO_free(bio);
    SSL_CTX_free(ctx);
    return NULL;
}

static int
TlsContext_init(TlsContextObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"pairs", NULL};
    PyObject *pairs, *seq;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:TlsContext", kwlist, &pairs))
        return -1;
    if (self->ctx != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "TlsContext is already initialised");
        return -1;
    }
    seq = PySequence_Fast(pairs, "pairs must be a sequence of (chain_pem, key_pem)");
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n < 1 || n > 1024) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "between 1 and 1024 certificate/key pairs");
        return -1;
    }
    self->ctx = PyMem_Calloc((size_t)n, sizeof(SSL_CTX *));
    self->leaf = PyMem_Calloc((size_t)n, sizeof(X509 *));
    if (self->ctx == NULL || self->leaf == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *chain, *key;
        Py_ssize_t chain_len, key_len;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "y#y#", &chain, &chain_len,
                              &key, &key_len)) {
            Py_DECREF(seq);
            return -1;
        }
        if (chain_len > INT32_MAX || key_len > INT32_MAX) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_ValueError, "PEM data too large");
            return -1;
        }
        ERR_clear_error();
        SSL_CTX *ctx = load_pair(chain, chain_len, key, key_len, &self->leaf[i]);
        if (ctx == NULL) {
            PyObject *why = ssl_reasons();
            Py_DECREF(seq);
            if (why != NULL) {
                PyErr_Format(PyExc_ValueError, "certificate/key pair %zd: %U", i, why);
                Py_DECREF(why);
            }
            return -1;
        }
        self->ctx[i] = ctx;
        self->count = (int)i + 1;
        /* The SNI callback needs this object; a connection keeps it alive. */
        SSL_CTX_set_client_hello_cb(ctx, select_certificate, self);
    }
    Py_DECREF(seq);
    return 0;
}

static PyTypeObject TlsContextType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ntspy._ke.TlsContext",
    .tp_doc = PyDoc_STR("TlsContext(pairs): NTS-KE server TLS settings for "
                        "[(chain_pem, key_pem), ...]; the first pair is the default, "
                        "the others are chosen by the client's SNI."),
    .tp_basicsize = sizeof(TlsContextObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)TlsContext_init,
    .tp_dealloc = (destructor)TlsContext_dealloc,
};

/* ------------------------------------------------------------------------ */
/* Connections */

typedef struct Conn {
    struct Conn *prev, *next; /* in the engine's deadline list for its phase */
    double accepted; /* monotonic seconds */
    double deadline;
    int listed; /* in the engine's list of open connections */
    int fd;
    int phase;
    int want_out; /* registered for EPOLLOUT */
    SSL *ssl;
    BIO *rbio, *wbio;
    TlsContextObject *tls; /* strong reference: the SNI callback reads it */
    unsigned char *req;
    size_t req_len, req_cap;
    size_t scanned; /* request bytes already seen to be whole records */
    unsigned char *out; /* TLS bytes the socket did not take yet */
    size_t out_len, out_off;
    struct sockaddr_storage peer;
    socklen_t peer_len;
    unsigned char offered[256]; /* ALPN list of a client we refused */
    unsigned int offered_len;
    int alpn_refused;
} Conn;

typedef struct {
    PyObject_HEAD
    int epfd, tfd, lfd;
    TlsContextObject *tls;
    PyObject *on_accept, *on_request, *on_failed;
    double timeout; /* the whole session, from accept to the last byte written */
    Conn *head, *tail; /* open connections, oldest (first deadline) first */
    Conn *current; /* the connection on_request is answering */
    int active;
    double accept_paused_until;
    double armed; /* when the timerfd goes off (0: not armed) */
    int closed;
    int running;           /* the engine thread is up (and holds a reference) */
    volatile int stopping; /* set by close() before it wakes and joins the thread */
    int wake_fd;           /* eventfd in the epoll set: close() wakes the thread */
    pthread_t thread;
} EngineObject;

/* epoll tags for the non-connection descriptors */
static char TAG_LISTEN, TAG_TIMER, TAG_WAKE;

/* Worker processes share one listening socket, each engine watching it: a
 * new connection wakes one of them, not all (the others would only find
 * nothing to accept).  EPOLLEXCLUSIVE cannot be changed by EPOLL_CTL_MOD, so
 * pausing accepts takes the socket out of the set and resuming puts it back. */
#define LISTEN_EVENTS (EPOLLIN | EPOLLEXCLUSIVE)

static int
select_alpn(SSL *ssl, const unsigned char **out, unsigned char *outlen,
            const unsigned char *in, unsigned int inlen, void *arg)
{
    (void)arg;
    if (SSL_select_next_proto((unsigned char **)out, outlen,
                              (const unsigned char *)ALPN_NTSKE, ALPN_NTSKE_LEN, in,
                              inlen) == OPENSSL_NPN_NEGOTIATED)
        return SSL_TLSEXT_ERR_OK;
    Conn *c = SSL_get_app_data(ssl);
    if (c != NULL) {
        c->alpn_refused = 1;
        c->offered_len = inlen < sizeof c->offered ? inlen : (unsigned int)sizeof c->offered;
        memcpy(c->offered, in, c->offered_len);
    }
    /* A fatal no_application_protocol alert (RFC 7301 s3.2). */
    return SSL_TLSEXT_ERR_ALERT_FATAL;
}

/* Switch to the pair whose certificate names the SNI host; the default otherwise. */
static int
select_certificate(SSL *ssl, int *alert, void *arg)
{
    (void)alert;
    TlsContextObject *tls = arg;
    const unsigned char *ext;
    size_t len;
    if (tls->count < 2 || !SSL_client_hello_get0_ext(ssl, TLSEXT_TYPE_server_name, &ext, &len))
        return SSL_CLIENT_HELLO_SUCCESS;
    /* server_name_list: u16 length, then (u8 type, u16 length, name)... */
    if (len < 5 || (size_t)((ext[0] << 8) | ext[1]) != len - 2 || ext[2] != TLSEXT_NAMETYPE_host_name)
        return SSL_CLIENT_HELLO_SUCCESS;
    size_t name_len = (size_t)((ext[3] << 8) | ext[4]);
    if (name_len == 0 || name_len > len - 5 || name_len > 255)
        return SSL_CLIENT_HELLO_SUCCESS;
    char name[256];
    memcpy(name, ext + 5, name_len);
    name[name_len] = '\0';
    if (memchr(name, '\0', name_len) != NULL)
        return SSL_CLIENT_HELLO_SUCCESS;
    for (int i = 0; i < tls->count; i++) {
        if (X509_check_host(tls->leaf[i], name, name_len, 0, NULL) == 1) {
            if (i > 0)
                SSL_set_SSL_CTX(ssl, tls->ctx[i]);
            break;
        }
    }
    return SSL_CLIENT_HELLO_SUCCESS;
}

static void
unlist(EngineObject *e, Conn *c)
{
    if (!c->listed)
        return;
    if (c->prev)
        c->prev->next = c->next;
    else
        e->head = c->next;
    if (c->next)
        c->next->prev = c->prev;
    else
        e->tail = c->prev;
    c->prev = c->next = NULL;
    c->listed = 0;
}

/* At accept: every connection has the same session timeout, so appending
 * keeps the list sorted by deadline.  Nothing moves a connection later. */
static void
enlist(EngineObject *e, Conn *c, double now)
{
    c->accepted = now;
    c->deadline = now + e->timeout;
    c->listed = 1;
    c->prev = e->tail;
    c->next = NULL;
    if (e->tail)
        e->tail->next = c;
    else
        e->head = c;
    e->tail = c;
}

/* Whether two peers are the same client for the per-address limit: the same
 * IPv4 address, or the same IPv6 /64 (one host usually holds a whole /64). */
static int
same_client(const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
    if (a->ss_family != b->ss_family)
        return 0;
    if (a->ss_family == AF_INET)
        return ((const struct sockaddr_in *)a)->sin_addr.s_addr ==
               ((const struct sockaddr_in *)b)->sin_addr.s_addr;
    if (a->ss_family == AF_INET6)
        return memcmp(&((const struct sockaddr_in6 *)a)->sin6_addr,
                      &((const struct sockaddr_in6 *)b)->sin6_addr, 8) == 0;
    return 0;
}

static void
conn_free(EngineObject *e, Conn *c)
{
    unlist(e, c);
    if (e->current == c)
        e->current = NULL;
    SSL_free(c->ssl); /* and both BIOs */
    close(c->fd);     /* also leaves the epoll set */
    Py_XDECREF(c->tls);
    PyMem_Free(c->req);
    PyMem_Free(c->out);
    PyMem_Free(c);
    e->active--;
}

static PyObject *
peer_host(const Conn *c)
{
    char text[INET6_ADDRSTRLEN];
    const void *addr;
    if (c->peer.ss_family == AF_INET)
        addr = &((const struct sockaddr_in *)&c->peer)->sin_addr;
    else if (c->peer.ss_family == AF_INET6)
        addr = &((const struct sockaddr_in6 *)&c->peer)->sin6_addr;
    else
        return PyUnicode_FromString("?");
    if (inet_ntop(c->peer.ss_family, addr, text, sizeof text) == NULL)
        return PyUnicode_FromString("?");
    return PyUnicode_FromString(text);
}

/* "client ADDRESS port N", as the asyncio path names a client in messages. */
static PyObject *
peer_who(const Conn *c)
{
    PyObject *host = peer_host(c);
    if (host == NULL)
        return NULL;
    int port = 0;
    if (c->peer.ss_family == AF_INET)
        port = ntohs(((const struct sockaddr_in *)&c->peer)->sin_port);
    else if (c->peer.ss_family == AF_INET6)
        port = ntohs(((const struct sockaddr_in6 *)&c->peer)->sin6_port);
    PyObject *who = PyUnicode_FromFormat("client %U port %d", host, port);
    Py_DECREF(host);
    return who;
}

/* Report a connection that ends without an answer, then drop it. */
static void
conn_fail(EngineObject *e, Conn *c, const char *kind, PyObject *detail)
{
    PyObject *who = peer_who(c);
    if (who != NULL) {
        PyObject *r = PyObject_CallFunction(e->on_failed, "OsO", who, kind,
                                            detail ? detail : Py_None);
        if (r == NULL)
            PyErr_WriteUnraisable(e->on_failed);
        Py_XDECREF(r);
        Py_DECREF(who);
    } else {
        PyErr_WriteUnraisable(e->on_failed);
    }
    conn_free(e, c);
}

static void
conn_fail_text(EngineObject *e, Conn *c, const char *kind, const char *detail)
{
    PyObject *text = detail ? PyUnicode_FromString(detail) : NULL;
    if (detail && text == NULL)
        PyErr_Clear();
    conn_fail(e, c, kind, text);
    Py_XDECREF(text);
}

static int
set_events(EngineObject *e, Conn *c, int want_out)
{
    if (c->want_out == want_out)
        return 0;
    struct epoll_event ev = {.events = want_out ? EPOLLOUT : EPOLLIN, .data.ptr = c};
    if (epoll_ctl(e->epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0)
        return -1;
    c->want_out = want_out;
    return 0;
}

/* Send what OpenSSL produced, keeping what the socket does not take.
 * 0: all sent, 1: some left (EPOLLOUT armed), -1: the socket failed (errno). */
static int
conn_flush(EngineObject *e, Conn *c)
{
    unsigned char chunk[READ_CHUNK];
    int n;
    while ((n = BIO_read(c->wbio, chunk, sizeof chunk)) > 0) {
        size_t have = c->out_len - c->out_off;
        if (have == 0) {
            /* the usual case: straight to the socket */
            ssize_t sent = send(c->fd, chunk, (size_t)n, MSG_NOSIGNAL);
            if (sent < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                return -1;
            if (sent == n)
                continue;
            if (sent < 0)
                sent = 0;
            unsigned char *kept = PyMem_Realloc(c->out, (size_t)(n - sent));
            if (kept == NULL) {
                errno = ENOMEM;
                return -1;
            }
            c->out = kept;
            c->out_off = 0;
            memcpy(c->out, chunk + sent, (size_t)(n - sent));
            c->out_len = (size_t)(n - sent);
        } else {
            unsigned char *grown = PyMem_Realloc(c->out, c->out_len + (size_t)n);
            if (grown == NULL) {
                errno = ENOMEM;
                return -1;
            }
            c->out = grown;
            memcpy(c->out + c->out_len, chunk, (size_t)n);
            c->out_len += (size_t)n;
        }
    }
    while (c->out_off < c->out_len) {
        ssize_t sent = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                return -1;
            break;
        }
        c->out_off += (size_t)sent;
    }
    if (c->out_off < c->out_len)
        return set_events(e, c, 1) < 0 ? -1 : 1;
    c->out_len = c->out_off = 0;
    return 0;
}

/* Whether the request bytes hold a whole KE message (End of Message seen), or
 * more than a message may hold: either way Python gets it now.  Scanning goes
 * on where it stopped, so a request trickling in costs linear time. */
static int
message_ready(Conn *c)
{
    size_t pos = c->scanned;
    if (c->req_len > MAX_MESSAGE)
        return 1;
    while (c->req_len - pos >= 4) {
        unsigned int type = ((unsigned int)(c->req[pos] & 0x7f) << 8) | c->req[pos + 1];
        size_t body = ((size_t)c->req[pos + 2] << 8) | c->req[pos + 3];
        size_t end = pos + 4 + body;
        if (end > MAX_MESSAGE)
            return 1;
        if (end > c->req_len)
            return 0;
        if (type == 0)
            return 1;
        pos = c->scanned = end;
    }
    return 0;
}

/* Hand the request to Python, send the answer and close_notify, then close. */
static void
conn_answer(EngineObject *e, Conn *c, int eof)
{
    PyObject *data = PyBytes_FromStringAndSize((const char *)c->req, (Py_ssize_t)c->req_len);
    if (data == NULL) {
        PyErr_WriteUnraisable(e->on_request);
        conn_free(e, c);
        return;
    }
    e->current = c;
    PyObject *answer = PyObject_CallFunctionObjArgs(e->on_request, data, eof ? Py_True : Py_False,
                                                    NULL);
    Py_DECREF(data);
    if (e->current != c) {
        /* the engine was closed from inside the callback */
        Py_XDECREF(answer);
        return;
    }
    e->current = NULL;
    if (answer == NULL || !PyBytes_Check(answer)) {
        if (answer == NULL)
            PyErr_WriteUnraisable(e->on_request);
        Py_XDECREF(answer);
        conn_free(e, c);
        return;
    }
    const char *buf = PyBytes_AS_STRING(answer);
    Py_ssize_t left = PyBytes_GET_SIZE(answer);
    while (left > 0) {
        int chunk = left > INT32_MAX ? INT32_MAX : (int)left;
        int n = SSL_write(c->ssl, buf, chunk);
        if (n <= 0)
            break; /* a memory BIO does not refuse: only a broken session does */
        buf += n;
        left -= n;
    }
    Py_DECREF(answer);
    ERR_clear_error();
    SSL_shutdown(c->ssl); /* close_notify */
    ERR_clear_error();
    c->phase = P_CLOSING; /* still bounded by the session deadline */
    if (conn_flush(e, c) != 1)
        conn_free(e, c); /* written (or the client is gone): done */
}

/* Advance one connection after its socket became readable (or writable). */
static void
conn_event(EngineObject *e, Conn *c, uint32_t events)
{
    unsigned char chunk[READ_CHUNK];
    int eof = 0;
    size_t taken = 0;

    if (c->phase == P_CLOSING) {
        int r = conn_flush(e, c);
        if (r != 1)
            conn_free(e, c);
        return;
    }
    if (c->want_out && (events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
        int r = conn_flush(e, c);
        if (r < 0) {
            conn_fail_text(e, c, "lost", strerror(errno));
            return;
        }
        if (r == 0 && set_events(e, c, 0) < 0) {
            conn_fail_text(e, c, "lost", strerror(errno));
            return;
        }
    }
    /* Read what is there, but never more than a message may hold per event. */
    while (taken <= MAX_MESSAGE + READ_CHUNK) {
        ssize_t n = recv(c->fd, chunk, sizeof chunk, 0);
        if (n > 0) {
            if (BIO_write(c->rbio, chunk, (int)n) != (int)n) {
                conn_fail_text(e, c, "lost", "out of memory");
                return;
            }
            taken += (size_t)n;
            if ((size_t)n < sizeof chunk)
                break;
            continue;
        }
        if (n == 0) {
            eof = 1;
            break;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            break;
        conn_fail_text(e, c, "lost", strerror(errno));
        return;
    }

    if (c->phase == P_HANDSHAKE) {
        ERR_clear_error();
        int r = SSL_do_handshake(c->ssl);
        if (r != 1) {
            int err = SSL_get_error(c->ssl, r);
            if (err == SSL_ERROR_WANT_READ) {
                if (conn_flush(e, c) < 0) {
                    conn_fail_text(e, c, "lost", strerror(errno));
                } else if (eof) {
                    conn_fail(e, c, "eof-handshake", NULL);
                }
                return;
            }
            PyObject *why;
            if (c->alpn_refused) {
                why = PyBytes_FromStringAndSize((const char *)c->offered, c->offered_len);
                ERR_clear_error();
            } else {
                why = ssl_reasons();
            }
            if (why == NULL)
                PyErr_Clear();
            (void)conn_flush(e, c); /* the alert, if any */
            conn_fail(e, c, c->alpn_refused ? "alpn" : "tls", why);
            Py_XDECREF(why);
            return;
        }
        const unsigned char *proto = NULL;
        unsigned int proto_len = 0;
        SSL_get0_alpn_selected(c->ssl, &proto, &proto_len);
        if (proto_len != ALPN_NTSKE_LEN - 1 || memcmp(proto, ALPN_NTSKE + 1, proto_len) != 0) {
            conn_fail(e, c, "no-alpn", NULL);
            return;
        }
        c->phase = P_REQUEST;
    }

    /* P_REQUEST: decrypt what arrived into the request buffer. */
    for (;;) {
        if (c->req_cap - c->req_len < READ_CHUNK) {
            size_t cap = c->req_cap ? c->req_cap * 2 : READ_CHUNK;
            unsigned char *grown = PyMem_Realloc(c->req, cap);
            if (grown == NULL) {
                conn_fail_text(e, c, "lost", "out of memory");
                return;
            }
            c->req = grown;
            c->req_cap = cap;
        }
        ERR_clear_error();
        int n = SSL_read(c->ssl, c->req + c->req_len, READ_CHUNK);
        if (n > 0) {
            c->req_len += (size_t)n;
            if (c->req_len > MAX_MESSAGE)
                break;
            continue;
        }
        int err = SSL_get_error(c->ssl, n);
        if (err == SSL_ERROR_WANT_READ)
            break;
        if (err == SSL_ERROR_ZERO_RETURN) {
            eof = 1; /* close_notify */
            break;
        }
        PyObject *why = ssl_reasons();
        if (why == NULL)
            PyErr_Clear();
        (void)conn_flush(e, c);
        conn_fail(e, c, "tls-receive", why);
        Py_XDECREF(why);
        return;
    }
    if (message_ready(c) || eof) {
        conn_answer(e, c, eof);
        return;
    }
    if (conn_flush(e, c) < 0)
        conn_fail_text(e, c, "lost", strerror(errno));
}

/* Keep the timerfd due no later than the earliest deadline.  It may go off
 * early: deadlines only move later as connections finish, so a timer armed
 * for one that is gone just wakes run() once, which re-arms it.  That saves
 * a timerfd_settime() on almost every run. */
static int
engine_rearm(EngineObject *e, double now)
{
    double next = e->head ? e->head->deadline : 0;
    if (e->accept_paused_until > 0 && (next == 0 || e->accept_paused_until < next))
        next = e->accept_paused_until;
    if (next == 0 || (e->armed > now && e->armed <= next))
        return 0; /* nothing to wait for, or the timer goes off in time anyway */
    struct itimerspec its;
    memset(&its, 0, sizeof its);
    its.it_value.tv_sec = (time_t)next;
    its.it_value.tv_nsec = (long)((next - (double)(time_t)next) * 1e9);
    if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0)
        its.it_value.tv_nsec = 1;
    if (timerfd_settime(e->tfd, TFD_TIMER_ABSTIME, &its, NULL) < 0)
        return -1;
    e->armed = next;
    return 0;
}

static void
engine_expire(EngineObject *e, double now)
{
    while (e->head && e->head->deadline <= now) {
        Conn *c = e->head;
        if (c->phase == P_CLOSING) {
            conn_free(e, c); /* answered; the client just does not read */
        } else if (c->phase == P_HANDSHAKE) {
            conn_fail(e, c, "timeout-handshake", NULL);
        } else {
            /* As the asyncio path: close_notify (best effort), then close. */
            SSL_shutdown(c->ssl);
            ERR_clear_error();
            (void)conn_flush(e, c);
            conn_fail(e, c, "timeout-request", NULL);
        }
    }
    if (e->accept_paused_until > 0 && e->accept_paused_until <= now) {
        struct epoll_event ev = {.events = LISTEN_EVENTS, .data.ptr = &TAG_LISTEN};
        if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, e->lfd, &ev) == 0)
            e->accept_paused_until = 0;
        else
            e->accept_paused_until = now + 1.0; /* out of memory: try again later */
    }
}

static void
engine_accept(EngineObject *e)
{
    for (int i = 0; i < ACCEPTS_PER_RUN; i++) {
        struct sockaddr_storage peer;
        socklen_t peer_len = sizeof peer;
        int fd = accept4(e->lfd, (struct sockaddr *)&peer, &peer_len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            /* Out of descriptors or memory: report, and stop accepting for a
             * second instead of spinning on a listening socket that stays readable. */
            PyObject *r = PyObject_CallFunction(e->on_failed, "Oss", Py_None, "accept",
                                                strerror(errno));
            if (r == NULL)
                PyErr_WriteUnraisable(e->on_failed);
            Py_XDECREF(r);
            if (epoll_ctl(e->epfd, EPOLL_CTL_DEL, e->lfd, NULL) == 0)
                e->accept_paused_until = monotonic() + 1.0;
            return;
        }
        Conn *c = PyMem_Calloc(1, sizeof(Conn));
        if (c == NULL) {
            close(fd);
            continue;
        }
        c->fd = fd;
        c->peer = peer;
        c->peer_len = peer_len;
        e->active++; /* conn_free undoes it */
        long same = 0;
        for (const Conn *o = e->head; o != NULL; o = o->next)
            same += same_client(&o->peer, &c->peer);

        PyObject *host = peer_host(c);
        PyObject *ok = host ? PyObject_CallFunction(e->on_accept, "Ol", host, same) : NULL;
        Py_XDECREF(host);
        if (ok == NULL)
            PyErr_WriteUnraisable(e->on_accept);
        int admitted = ok != NULL && PyObject_IsTrue(ok) == 1;
        Py_XDECREF(ok);
        if (!admitted) {
            conn_free(e, c); /* dropped at the door */
            continue;
        }
        c->ssl = SSL_new(e->tls->ctx[0]);
        c->rbio = BIO_new(BIO_s_mem());
        c->wbio = BIO_new(BIO_s_mem());
        if (c->ssl == NULL || c->rbio == NULL || c->wbio == NULL) {
            if (c->ssl == NULL) {
                BIO_free(c->rbio);
                BIO_free(c->wbio);
            } else {
                /* SSL_set_bio takes what it is given */
                SSL_set_bio(c->ssl, c->rbio, c->wbio);
            }
            c->rbio = c->wbio = NULL;
            ERR_clear_error();
            conn_fail_text(e, c, "tls", "cannot set up TLS (out of memory)");
            continue;
        }
        BIO_set_mem_eof_return(c->rbio, -1); /* empty means "wait", not EOF */
        SSL_set_bio(c->ssl, c->rbio, c->wbio);
        SSL_set_app_data(c->ssl, c);
        SSL_set_accept_state(c->ssl);
        c->tls = e->tls;
        Py_INCREF(c->tls);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
            conn_fail_text(e, c, "lost", strerror(errno));
            continue;
        }
        enlist(e, c, monotonic());
        /* Under load the ClientHello is there already, and this saves a round
         * through epoll; on an idle server it costs one recv that finds nothing. */
        conn_event(e, c, EPOLLIN);
    }
}

static void
engine_close_all(EngineObject *e)
{
    if (e->closed)
        return;
    e->closed = 1;
    while (e->head) {
        Conn *c = e->head;
        if (c->phase == P_CLOSING)
            conn_free(e, c);
        else
            conn_fail(e, c, "shutdown", NULL);
    }
    if (e->epfd >= 0)
        close(e->epfd);
    if (e->tfd >= 0)
        close(e->tfd);
    e->epfd = e->tfd = -1;
    /* The callbacks are usually bound methods of the object that owns this
     * engine: letting go of them breaks that reference cycle. */
    Py_CLEAR(e->on_accept);
    Py_CLEAR(e->on_request);
    Py_CLEAR(e->on_failed);
}

/* ------------------------------------------------------------------------ */
/* Engine: Python interface */

static int
Engine_init(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"listen_fd", "tls", "on_accept", "on_request", "on_failed",
                             "session_timeout", NULL};
    int lfd;
    PyObject *tls, *on_accept, *on_request, *on_failed;
    double timeout;
    if (self->epfd != 0 || self->tfd != 0) {
        PyErr_SetString(PyExc_RuntimeError, "Engine is already initialised");
        return -1;
    }
    self->epfd = self->tfd = self->wake_fd = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iO!OOOd:Engine", kwlist, &lfd,
                                     &TlsContextType, &tls, &on_accept, &on_request,
                                     &on_failed, &timeout))
        return -1;
    if (!(timeout > 0)) {
        PyErr_SetString(PyExc_ValueError, "the session timeout must be positive");
        return -1;
    }
    self->lfd = lfd;
    self->timeout = timeout;
    Py_INCREF(tls);
    self->tls = (TlsContextObject *)tls;
    Py_INCREF(on_accept);
    self->on_accept = on_accept;
    Py_INCREF(on_request);
    self->on_request = on_request;
    Py_INCREF(on_failed);
    self->on_failed = on_failed;
    self->epfd = epoll_create1(EPOLL_CLOEXEC);
    self->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    self->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    struct epoll_event lev = {.events = LISTEN_EVENTS, .data.ptr = &TAG_LISTEN};
    struct epoll_event tev = {.events = EPOLLIN, .data.ptr = &TAG_TIMER};
    struct epoll_event wev = {.events = EPOLLIN, .data.ptr = &TAG_WAKE};
    if (self->epfd < 0 || self->tfd < 0 || self->wake_fd < 0 ||
        epoll_ctl(self->epfd, EPOLL_CTL_ADD, lfd, &lev) < 0 ||
        epoll_ctl(self->epfd, EPOLL_CTL_ADD, self->tfd, &tev) < 0 ||
        epoll_ctl(self->epfd, EPOLL_CTL_ADD, self->wake_fd, &wev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    /* Accepted sockets inherit it: the answer goes out without Nagle's wait. */
    int one = 1;
    (void)setsockopt(lfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return 0;
}

static void
Engine_dealloc(EngineObject *self)
{
    /* Never closed: let go of everything without calling back into Python. */
    while (self->head)
        conn_free(self, self->head);
    if (!self->closed) {
        if (self->epfd > 0)
            close(self->epfd);
        if (self->tfd > 0)
            close(self->tfd);
    }
    if (self->wake_fd > 0)
        close(self->wake_fd);
    Py_XDECREF(self->tls);
    Py_XDECREF(self->on_accept);
    Py_XDECREF(self->on_request);
    Py_XDECREF(self->on_failed);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Handle one batch of epoll events (with the GIL). */
static void
engine_process(EngineObject *e, struct epoll_event *events, int n)
{
    /* A connection freed while handling an event cannot show up later in
     * the same batch: each descriptor has one event per epoll_wait, and only
     * the connection being handled is ever freed here. */
    for (int i = 0; i < n; i++) {
        void *tag = events[i].data.ptr;
        if (tag == &TAG_LISTEN) {
            engine_accept(e);
        } else if (tag == &TAG_TIMER) {
            uint64_t ticks;
            if (read(e->tfd, &ticks, sizeof ticks) == sizeof ticks)
                e->armed = 0; /* went off; deadlines: below */
        } else if (tag != &TAG_WAKE) {
            conn_event(e, (Conn *)tag, events[i].events);
        }
    }
    double now = monotonic();
    engine_expire(e, now);
    (void)engine_rearm(e, now); /* cannot fail with a valid timerfd */
}

/* The engine's thread: waits in epoll_wait without the GIL, takes it to
 * handle what is ready.  Signals stay with Python's main thread. */
static void *
engine_thread(void *arg)
{
    EngineObject *e = arg;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    PyGILState_STATE gil = PyGILState_Ensure(); /* this thread's Python state */
    PyThreadState *ts = PyEval_SaveThread();
    struct epoll_event events[EVENTS_PER_RUN];
    for (;;) {
        int n = epoll_wait(e->epfd, events, EVENTS_PER_RUN, -1);
        int failed = n < 0 && errno != EINTR;
        PyEval_RestoreThread(ts);
        if (e->stopping || failed)
            break;
        if (n > 0)
            engine_process(e, events, n);
        ts = PyEval_SaveThread();
    }
    PyGILState_Release(gil);
    return NULL;
}

static PyObject *
Engine_start(EngineObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->closed || self->running || self->epfd < 0) {
        PyErr_SetString(PyExc_RuntimeError, "the engine is closed or already started");
        return NULL;
    }
    Py_INCREF(self); /* the thread's reference, given back by close() */
    self->running = 1;
    int err = pthread_create(&self->thread, NULL, engine_thread, self);
    if (err != 0) {
        self->running = 0;
        Py_DECREF(self);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *
Engine_close(EngineObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->running) {
        if (pthread_equal(pthread_self(), self->thread)) {
            PyErr_SetString(PyExc_RuntimeError, "close() from the engine's own callbacks");
            return NULL;
        }
        self->stopping = 1;
        uint64_t one = 1;
        (void)!write(self->wake_fd, &one, sizeof one);
        Py_BEGIN_ALLOW_THREADS
        pthread_join(self->thread, NULL);
        Py_END_ALLOW_THREADS
        self->running = 0;
    }
    self->current = NULL;
    engine_close_all(self);
    if (self->wake_fd >= 0) {
        close(self->wake_fd);
        self->wake_fd = -1;
    }
    if (self->stopping) {
        self->stopping = 0;
        Py_DECREF(self); /* the thread's; the caller still holds one */
    }
    Py_RETURN_NONE;
}

static PyObject *
Engine_export(EngineObject *self, PyObject *args)
{
    const char *label, *context;
    Py_ssize_t label_len, context_len;
    int length;
    if (!PyArg_ParseTuple(args, "y#iy#:export", &label, &label_len, &length, &context,
                          &context_len))
        return NULL;
    if (self->current == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "export() outside of on_request");
        return NULL;
    }
    if (length < 1 || length > 255) {
        PyErr_SetString(PyExc_ValueError, "exporter length must be 1-255 bytes");
        return NULL;
    }
    unsigned char out[255];
    ERR_clear_error();
    if (SSL_export_keying_material(self->current->ssl, out, (size_t)length, label,
                                   (size_t)label_len, (const unsigned char *)context,
                                   (size_t)context_len, 1) != 1) {
        PyObject *why = ssl_reasons();
        if (why != NULL) {
            PyErr_Format(PyExc_ValueError, "TLS exporter failed: %U", why);
            Py_DECREF(why);
        }
        return NULL;
    }
    PyObject *key = PyBytes_FromStringAndSize((const char *)out, length);
    OPENSSL_cleanse(out, sizeof out);
    return key;
}

static PyObject *
Engine_peer(EngineObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->current == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "peer() outside of on_request");
        return NULL;
    }
    return peer_who(self->current);
}

static PyObject *
Engine_elapsed(EngineObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->current == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "elapsed() outside of on_request");
        return NULL;
    }
    return PyFloat_FromDouble(monotonic() - self->current->accepted);
}

static PyObject *
Engine_set_tls(EngineObject *self, PyObject *tls)
{
    if (!PyObject_TypeCheck(tls, &TlsContextType)) {
        PyErr_SetString(PyExc_TypeError, "set_tls() needs a TlsContext");
        return NULL;
    }
    Py_INCREF(tls);
    Py_SETREF(self->tls, (TlsContextObject *)tls);
    Py_RETURN_NONE;
}

static PyObject *
Engine_get_active(EngineObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromLong(self->active);
}

static PyMethodDef Engine_methods[] = {
    {"start", (PyCFunction)Engine_start, METH_NOARGS,
     PyDoc_STR("Start serving in a thread of the engine's own, which holds the GIL "
               "only while it handles ready connections and calls back.")},
    {"close", (PyCFunction)Engine_close, METH_NOARGS,
     PyDoc_STR("Stop the thread, cut every open connection (reported as 'shutdown') "
               "and release the epoll set; the listening socket stays the caller's.")},
    {"export", (PyCFunction)Engine_export, METH_VARARGS,
     PyDoc_STR("export(label, length, context): RFC 5705/8446 exporter of the connection "
               "being answered (only inside on_request).")},
    {"peer", (PyCFunction)Engine_peer, METH_NOARGS,
     PyDoc_STR("'client ADDRESS port N' of the connection being answered.")},
    {"elapsed", (PyCFunction)Engine_elapsed, METH_NOARGS,
     PyDoc_STR("Seconds since the connection being answered was accepted.")},
    {"set_tls", (PyCFunction)Engine_set_tls, METH_O,
     PyDoc_STR("Use this TlsContext for connections accepted from now on.")},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Engine_getset[] = {
    {"active", (getter)Engine_get_active, NULL, PyDoc_STR("Connections open now."), NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ntspy._ke.Engine",
    .tp_doc = PyDoc_STR("Engine(listen_fd, tls, on_accept, on_request, on_failed, "
                        "session_timeout)"),
    .tp_basicsize = sizeof(EngineObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
    .tp_getset = Engine_getset,
};

static struct PyModuleDef ke_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "ntspy._ke",
    .m_doc = PyDoc_STR("NTS-KE server connections (accept, TLS 1.3, one request, one "
                       "answer) over the system OpenSSL."),
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__ke(void)
{
    if (OPENSSL_init_ssl(0, NULL) != 1) {
        PyErr_SetString(PyExc_ImportError, "OpenSSL's libssl failed to initialise");
        return NULL;
    }
    if (PyType_Ready(&TlsContextType) < 0 || PyType_Ready(&EngineType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&ke_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&TlsContextType);
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "TlsContext", (PyObject *)&TlsContextType) < 0 ||
        PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0 ||
        PyModule_AddIntConstant(m, "MAX_MESSAGE", MAX_MESSAGE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
