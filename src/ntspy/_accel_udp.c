/*
 * Batched datagram I/O for the UDP server loop (net/udp.py).
 *
 * recvmsg + sendto cost ~4.7 us per NTS exchange in Python, most of it the
 * two system calls and the objects socket.recvmsg builds. recvmmsg/sendmmsg
 * move up to BATCH_MAX datagrams per call. Both functions hold the GIL: the
 * calls are non-blocking (MSG_DONTWAIT), and nothing here runs Python code
 * between building the message vectors and the system call, so no other
 * thread or finalizer can change what the kernel is reading or writing.
 */
#include "_accel.h"

#include <limits.h>
#include <string.h>
#include <errno.h>
#include <net/if.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <sys/socket.h>
#include <time.h>

/* Datagrams per call at most; the kernel caps sendmmsg at UIO_MAXIOV (1024). */
#define BATCH_MAX 256
/* Per-datagram receive buffer at most: the largest UDP payload. */
#define BATCH_BUFSIZE_MAX 65536
/* Control buffer per message: room for the timestamp and one more cmsg, in
 * case something else (e.g. IP_PKTINFO) is enabled on the socket. */
#define BATCH_CMSG_SPACE (CMSG_SPACE(sizeof(struct timespec)) + CMSG_SPACE(64))
/* A send interrupted by a signal is retried this many times, then skipped. */
#define EINTR_RETRIES 3

#if !defined(SCM_TIMESTAMPNS) && defined(SO_TIMESTAMPNS)
#define SCM_TIMESTAMPNS SO_TIMESTAMPNS
#endif

/* An int argument (Python 3.11 has no public PyLong_AsInt). */
static int
arg_int(PyObject *obj, const char *what, int *out)
{
    long v = PyLong_AsLong(obj);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < INT_MIN || v > INT_MAX) {
        PyErr_Format(PyExc_OverflowError, "%s out of range", what);
        return -1;
    }
    *out = (int)v;
    return 0;
}

typedef union {
    struct cmsghdr align;
    unsigned char buf[BATCH_CMSG_SPACE];
} CmsgBuf;

/* The kernel receive time in Unix ns, or -1 when no SCM_TIMESTAMPNS came. */
static long long
msg_rx_ns(struct msghdr *msg)
{
    for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c != NULL; c = CMSG_NXTHDR(msg, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS
            && c->cmsg_len >= CMSG_LEN(sizeof(struct timespec))) {
            struct timespec ts;
            memcpy(&ts, CMSG_DATA(c), sizeof ts);
            if (ts.tv_sec < 0 || ts.tv_nsec < 0 || ts.tv_nsec >= 1000000000L
                || (long long)ts.tv_sec > LLONG_MAX / 1000000000LL - 1)
                return -1;
            return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
        }
    }
    return -1;
}

/* The sender in Python's socket address format; None for other families. */
static PyObject *
sockaddr_to_py(const struct sockaddr_storage *ss, socklen_t len)
{
    char host[INET6_ADDRSTRLEN + 1 + IF_NAMESIZE + 1];

    if (ss->ss_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        if (inet_ntop(AF_INET, &a->sin_addr, host, sizeof host) == NULL)
            return PyErr_SetFromErrno(PyExc_OSError);
        return Py_BuildValue("(si)", host, (int)ntohs(a->sin_port));
    }
    if (ss->ss_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        if (inet_ntop(AF_INET6, &a->sin6_addr, host, INET6_ADDRSTRLEN) == NULL)
            return PyErr_SetFromErrno(PyExc_OSError);
        /* Like getnameinfo(NI_NUMERICHOST), which socket.recvmsg uses: a
         * link-local address carries its interface ("fe80::1%eth0"). */
        if (a->sin6_scope_id != 0
            && (IN6_IS_ADDR_LINKLOCAL(&a->sin6_addr) || IN6_IS_ADDR_MC_LINKLOCAL(&a->sin6_addr))) {
            size_t n = strlen(host);
            char ifname[IF_NAMESIZE];
            host[n++] = '%';
            if (if_indextoname(a->sin6_scope_id, ifname) != NULL)
                snprintf(host + n, sizeof host - n, "%s", ifname);
            else
                snprintf(host + n, sizeof host - n, "%u", (unsigned)a->sin6_scope_id);
        }
        return Py_BuildValue("(siII)", host, (int)ntohs(a->sin6_port),
                             (unsigned int)ntohl(a->sin6_flowinfo),
                             (unsigned int)a->sin6_scope_id);
    }
    Py_RETURN_NONE;
}

const char recv_batch_doc[] = (
"recv_batch(fd, max_count, bufsize, /) -> list[tuple[bytes | None, tuple | None, int]]\n\n"
"Read up to max_count (1-256) queued datagrams from fd with one recvmmsg call,\n"
"without blocking. Each is (data, address, rx_ns): address in the socket\n"
"module's format (None for families other than AF_INET/AF_INET6), rx_ns the\n"
"SCM_TIMESTAMPNS kernel receive time in Unix ns or -1 without one, and data\n"
"None when the datagram was longer than bufsize (1-65536) and got truncated.\n"
"An empty list when nothing is queued; OSError on other errors.");

PyObject *
accel_recv_batch(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    int fd, count, bufsize, got;
    struct mmsghdr *msgs;
    struct iovec *iov;
    struct sockaddr_storage *names;
    CmsgBuf *cmsgs;
    unsigned char *data;
    size_t meta;
    PyObject *result = NULL;

    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "recv_batch() takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    if (arg_int(args[0], "fd", &fd) < 0 || arg_int(args[1], "max_count", &count) < 0
        || arg_int(args[2], "bufsize", &bufsize) < 0)
        return NULL;
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "fd must be a non-negative file descriptor");
        return NULL;
    }
    if (count < 1 || count > BATCH_MAX) {
        PyErr_Format(PyExc_ValueError, "max_count must be 1-%d", BATCH_MAX);
        return NULL;
    }
    if (bufsize < 1 || bufsize > BATCH_BUFSIZE_MAX) {
        PyErr_Format(PyExc_ValueError, "bufsize must be 1-%d", BATCH_BUFSIZE_MAX);
        return NULL;
    }

    /* One allocation per call (not a static buffer): building the result can
     * run the garbage collector, and a finalizer could call us again. */
    meta = (size_t)count * (sizeof *msgs + sizeof *iov + sizeof *names + sizeof *cmsgs);
    msgs = PyMem_Malloc(meta + (size_t)count * (size_t)bufsize);
    if (msgs == NULL)
        return PyErr_NoMemory();
    names = (struct sockaddr_storage *)(msgs + count);
    cmsgs = (CmsgBuf *)(names + count);
    iov = (struct iovec *)(cmsgs + count);
    data = (unsigned char *)(iov + count);
    memset(msgs, 0, (size_t)count * sizeof *msgs);
    for (int i = 0; i < count; i++) {
        iov[i].iov_base = data + (size_t)i * (size_t)bufsize;
        iov[i].iov_len = (size_t)bufsize;
        msgs[i].msg_hdr.msg_name = &names[i];
        msgs[i].msg_hdr.msg_namelen = sizeof names[i];
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_control = cmsgs[i].buf;
        msgs[i].msg_hdr.msg_controllen = sizeof cmsgs[i].buf;
    }

    got = recvmmsg(fd, msgs, (unsigned int)count, MSG_DONTWAIT, NULL);
    if (got < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
            result = PyList_New(0);
        else
            PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }

    result = PyList_New(got);
    if (result == NULL)
        goto done;
    for (int i = 0; i < got; i++) {
        struct msghdr *h = &msgs[i].msg_hdr;
        PyObject *payload, *addr, *item;
        long long rx_ns = msg_rx_ns(h);

        if (h->msg_flags & MSG_TRUNC) {
            payload = Py_NewRef(Py_None);
        } else {
            size_t n = msgs[i].msg_len <= (unsigned int)bufsize ? msgs[i].msg_len : (size_t)bufsize;
            payload = PyBytes_FromStringAndSize((const char *)iov[i].iov_base, (Py_ssize_t)n);
            if (payload == NULL)
                goto fail;
        }
        addr = sockaddr_to_py(&names[i], h->msg_namelen);
        if (addr == NULL) {
            Py_DECREF(payload);
            goto fail;
        }
        item = PyTuple_New(3);
        if (item == NULL) {
            Py_DECREF(payload);
            Py_DECREF(addr);
            goto fail;
        }
        PyTuple_SET_ITEM(item, 0, payload); /* steals */
        PyTuple_SET_ITEM(item, 1, addr);
        PyObject *ts = PyLong_FromLongLong(rx_ns);
        if (ts == NULL) {
            Py_DECREF(item);
            goto fail;
        }
        PyTuple_SET_ITEM(item, 2, ts);
        PyList_SET_ITEM(result, i, item);
    }
    goto done;
fail:
    /* Unfilled list slots are NULL, which list dealloc skips. */
    Py_CLEAR(result);
done:
    PyMem_Free(msgs);
    return result;
}

/* host: a numeric IPv4 or IPv6 address, IPv6 optionally with "%scope". */
static int
py_to_sockaddr(PyObject *addr, struct sockaddr_storage *ss, socklen_t *len)
{
    Py_ssize_t n = PyTuple_Check(addr) ? PyTuple_GET_SIZE(addr) : 0;
    PyObject *host_obj, *port_obj;
    const char *host;
    Py_ssize_t host_len;
    long port;
    char buf[INET6_ADDRSTRLEN + 1 + IF_NAMESIZE + 1];
    char *pct;

    if (n != 2 && n != 4) {
        PyErr_SetString(PyExc_TypeError,
                        "address must be a tuple (host, port) or (host, port, flowinfo, scope_id)");
        return -1;
    }
    host_obj = PyTuple_GET_ITEM(addr, 0);
    port_obj = PyTuple_GET_ITEM(addr, 1);
    /* Exact types only: an int or str subclass could run Python code while
     * being converted, and that code could change the list being sent. */
    if (!PyUnicode_CheckExact(host_obj) || !PyLong_CheckExact(port_obj)) {
        PyErr_SetString(PyExc_TypeError, "address must hold a str host and an int port");
        return -1;
    }
    host = PyUnicode_AsUTF8AndSize(host_obj, &host_len);
    if (host == NULL)
        return -1;
    if (host_len <= 0 || (size_t)host_len >= sizeof buf || strlen(host) != (size_t)host_len) {
        PyErr_SetString(PyExc_ValueError, "host must be a numeric IPv4 or IPv6 address");
        return -1;
    }
    port = PyLong_AsLong(port_obj);
    if (port == -1 && PyErr_Occurred())
        return -1;
    if (port < 0 || port > 65535) {
        PyErr_SetString(PyExc_OverflowError, "port must be 0-65535");
        return -1;
    }
    memcpy(buf, host, (size_t)host_len + 1);
    memset(ss, 0, sizeof *ss);

    if (n == 2 && strchr(buf, ':') == NULL) {
        struct sockaddr_in *a = (struct sockaddr_in *)ss;
        if (inet_pton(AF_INET, buf, &a->sin_addr) != 1) {
            PyErr_SetString(PyExc_ValueError, "host must be a numeric IPv4 or IPv6 address");
            return -1;
        }
        a->sin_family = AF_INET;
        a->sin_port = htons((unsigned short)port);
        *len = sizeof *a;
        return 0;
    }

    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
    unsigned long flowinfo = 0, scope = 0;
    if (n == 4) {
        PyObject *f = PyTuple_GET_ITEM(addr, 2), *s = PyTuple_GET_ITEM(addr, 3);
        if (!PyLong_CheckExact(f) || !PyLong_CheckExact(s)) {
            PyErr_SetString(PyExc_TypeError, "flowinfo and scope_id must be int");
            return -1;
        }
        flowinfo = PyLong_AsUnsignedLong(f);
        if (flowinfo == (unsigned long)-1 && PyErr_Occurred())
            return -1;
        scope = PyLong_AsUnsignedLong(s);
        if (scope == (unsigned long)-1 && PyErr_Occurred())
            return -1;
        if (flowinfo > 0xfffffUL) {
            PyErr_SetString(PyExc_OverflowError, "flowinfo must be 0-1048575");
            return -1;
        }
        if (scope > 0xffffffffUL) {
            PyErr_SetString(PyExc_OverflowError, "scope_id must fit 32 bits");
            return -1;
        }
    }
    pct = strchr(buf, '%');
    if (pct != NULL) {
        *pct++ = '\0';
        if (scope == 0) {
            /* As recv_batch writes it: an interface name or number. */
            char *end;
            unsigned long v = strtoul(pct, &end, 10);
            if (*pct != '\0' && *end == '\0' && v <= 0xffffffffUL)
                scope = v;
            else if ((scope = if_nametoindex(pct)) == 0) {
                PyErr_SetString(PyExc_ValueError, "unknown IPv6 scope");
                return -1;
            }
        }
    }
    if (inet_pton(AF_INET6, buf, &a6->sin6_addr) != 1) {
        PyErr_SetString(PyExc_ValueError, "host must be a numeric IPv4 or IPv6 address");
        return -1;
    }
    a6->sin6_family = AF_INET6;
    a6->sin6_port = htons((unsigned short)port);
    a6->sin6_flowinfo = htonl((uint32_t)flowinfo);
    a6->sin6_scope_id = (uint32_t)scope;
    *len = sizeof *a6;
    return 0;
}

const char send_batch_doc[] = (
"send_batch(fd, items, /) -> int\n\n"
"Send each (data: bytes, address) of items (a list or tuple of at most 256)\n"
"from fd with sendmmsg, without blocking. Addresses are numeric, in the\n"
"socket module's format. A datagram the kernel refuses is skipped and the\n"
"rest still go out; returns how many were sent. Malformed items raise\n"
"TypeError/ValueError/OverflowError before anything is sent.");

PyObject *
accel_send_batch(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    int fd;
    Py_ssize_t count;
    PyObject *items;
    struct mmsghdr *msgs = NULL;
    struct iovec *iov;
    struct sockaddr_storage *names;
    Py_ssize_t start = 0, sent = 0;
    int retries = 0;

    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "send_batch() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    if (arg_int(args[0], "fd", &fd) < 0)
        return NULL;
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "fd must be a non-negative file descriptor");
        return NULL;
    }
    if (!PyList_Check(args[1]) && !PyTuple_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "items must be a list or tuple");
        return NULL;
    }
    /* A private copy: the items stay alive and in place until we return. */
    items = PySequence_Tuple(args[1]);
    if (items == NULL)
        return NULL;
    count = PyTuple_GET_SIZE(items);
    if (count > BATCH_MAX) {
        PyErr_Format(PyExc_ValueError, "at most %d items per call", BATCH_MAX);
        goto fail;
    }
    if (count == 0) {
        Py_DECREF(items);
        return PyLong_FromLong(0);
    }
    msgs = PyMem_Malloc((size_t)count * (sizeof *msgs + sizeof *names + sizeof *iov));
    if (msgs == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    names = (struct sockaddr_storage *)(msgs + count);
    iov = (struct iovec *)(names + count);
    memset(msgs, 0, (size_t)count * sizeof *msgs);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PyTuple_GET_ITEM(items, i);
        PyObject *payload;
        socklen_t namelen;

        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            PyErr_SetString(PyExc_TypeError, "each item must be a tuple (data, address)");
            goto fail;
        }
        payload = PyTuple_GET_ITEM(item, 0);
        if (!PyBytes_Check(payload)) {
            PyErr_SetString(PyExc_TypeError, "data must be bytes");
            goto fail;
        }
        if (py_to_sockaddr(PyTuple_GET_ITEM(item, 1), &names[i], &namelen) < 0)
            goto fail;
        iov[i].iov_base = PyBytes_AS_STRING(payload);
        iov[i].iov_len = (size_t)PyBytes_GET_SIZE(payload);
        msgs[i].msg_hdr.msg_name = &names[i];
        msgs[i].msg_hdr.msg_namelen = namelen;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }

    /* sendmmsg stops at the first datagram it cannot send: it returns how
     * many went before it, or -1 when it is the first. Skip that one. */
    while (start < count) {
        int r = sendmmsg(fd, msgs + start, (unsigned int)(count - start), MSG_DONTWAIT);
        if (r > 0) {
            start += r;
            sent += r;
            retries = 0;
        } else if (r < 0 && errno == EINTR && retries < EINTR_RETRIES) {
            retries++;
        } else {
            start++;
            retries = 0;
        }
    }
    PyMem_Free(msgs);
    Py_DECREF(items);
    return PyLong_FromSsize_t(sent);
fail:
    PyMem_Free(msgs);
    Py_DECREF(items);
    return NULL;
}

