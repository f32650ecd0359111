/*
 * The compiled backend of proto/nts.py's response builder: the NtsPlan type.
 *
 * proto/nts.py's ResponsePlan decides the whole layout of a session's
 * responses once (the cookie field's header and padding, the authenticator's
 * header for each cookie count, its paddings) and hands it here, where it is
 * checked once, when the plan is made. Per packet this file only fills that
 * template: it verifies a request's authenticator under the C2S key, seals
 * the new cookies under the master key and the encrypted part under the S2C
 * key. The integers a packet brings are checked against the buffers they
 * index, nothing more: which offsets they are was decided by
 * proto/nts.py's scan_request.
 *
 * The Python builder (ResponsePlan in proto/nts.py) makes the same bytes;
 * tests/unit/test_backends.py compares the two under hypothesis.
 */
#include "_accel.h"

#include <string.h>

#include <openssl/crypto.h>

#define NTS_HEADER_LEN 48
#define NTS_COOKIE_NONCE 16
#define NTS_MAX_COOKIES 8
#define NTS_MAX_FIELD 1024 /* any one piece of the template: far above real sizes */
#define NTS_MAX_HEAD 16 /* a cookie EF header, a cookie prefix */
#define NTS_AUTH_HEAD 8 /* an authenticator's header: EF type, length, nonce and ciphertext lengths */

typedef struct {
    PyObject_HEAD
    AesSivObject *c2s, *s2c, *master; /* owned references */
    unsigned char cookie_head[2 * NTS_MAX_HEAD]; /* cookie EF header | cookie prefix */
    size_t ef_head_len, prefix_len;
    unsigned char *plain; /* the plaintext each new cookie seals (PyMem) */
    size_t plain_len, cookie_pad, cookie_field, nonce_len, nonce_pad;
    unsigned char auth_head[NTS_MAX_COOKIES + 1][NTS_AUTH_HEAD]; /* per cookie count */
    size_t tail[NTS_MAX_COOKIES + 1]; /* zeros after the ciphertext, per cookie count */
} NtsPlanObject;

static void
NtsPlan_dealloc(NtsPlanObject *self)
{
    Py_XDECREF(self->c2s);
    Py_XDECREF(self->s2c);
    Py_XDECREF(self->master);
    if (self->plain != NULL) {
        wipe(self->plain, self->plain_len ? self->plain_len : 1);
        PyMem_Free(self->plain);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A length in [min, max] or -1 with ValueError. */
static Py_ssize_t
bounded(PyObject *obj, const char *what, Py_ssize_t min, Py_ssize_t max)
{
    Py_ssize_t v = PyLong_AsSsize_t(obj);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < min || v > max) {
        PyErr_Format(PyExc_ValueError, "%s out of range", what);
        return -1;
    }
    return v;
}

static int
short_bytes(PyObject *obj, const char *what, Py_ssize_t min, Py_ssize_t max)
{
    if (!PyBytes_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be bytes", what);
        return 0;
    }
    Py_ssize_t n = PyBytes_GET_SIZE(obj);
    if (n < min || n > max) {
        PyErr_Format(PyExc_ValueError, "%s has a wrong length (%zd)", what, n);
        return 0;
    }
    return 1;
}

static PyObject *
NtsPlan_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"c2s", "s2c", "master", "cookie_ef_head", "cookie_prefix",
                             "cookie_plain", "cookie_pad", "nonce_len", "nonce_pad",
                             "auth_heads", "tails", NULL};
    PyObject *c2s, *s2c, *master, *ef_head, *prefix, *plain, *heads, *tails;
    Py_ssize_t cookie_pad, nonce_len, nonce_pad;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O!O!SSSnnnOO:NtsPlan", kwlist,
                                     &AesSivType, &c2s, &AesSivType, &s2c, &AesSivType, &master,
                                     &ef_head, &prefix, &plain, &cookie_pad, &nonce_len,
                                     &nonce_pad, &heads, &tails))
        return NULL;
    if (!short_bytes(ef_head, "cookie_ef_head", 0, NTS_MAX_HEAD)
        || !short_bytes(prefix, "cookie_prefix", 0, NTS_MAX_HEAD)
        || !short_bytes(plain, "cookie_plain", 0, NTS_MAX_FIELD))
        return NULL;
    if (cookie_pad < 0 || cookie_pad > NTS_MAX_FIELD || nonce_len < 1
        || nonce_len > NTS_MAX_FIELD || nonce_pad < 0 || nonce_pad > NTS_MAX_FIELD) {
        PyErr_SetString(PyExc_ValueError, "a padding or the nonce length is out of range");
        return NULL;
    }
    if (!PyTuple_Check(heads) || PyTuple_GET_SIZE(heads) != NTS_MAX_COOKIES + 1
        || !PyTuple_Check(tails) || PyTuple_GET_SIZE(tails) != NTS_MAX_COOKIES + 1) {
        PyErr_SetString(PyExc_TypeError, "auth_heads and tails must be tuples of 9");
        return NULL;
    }
    NtsPlanObject *self = (NtsPlanObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    for (int i = 0; i <= NTS_MAX_COOKIES; i++) {
        PyObject *h = PyTuple_GET_ITEM(heads, i);
        Py_ssize_t t;
        if (!short_bytes(h, "an authenticator header", NTS_AUTH_HEAD, NTS_AUTH_HEAD)
            || (t = bounded(PyTuple_GET_ITEM(tails, i), "a tail", 0, NTS_MAX_FIELD)) < 0) {
            Py_DECREF(self);
            return NULL;
        }
        memcpy(self->auth_head[i], PyBytes_AS_STRING(h), NTS_AUTH_HEAD);
        self->tail[i] = (size_t)t;
    }
    self->ef_head_len = (size_t)PyBytes_GET_SIZE(ef_head);
    self->prefix_len = (size_t)PyBytes_GET_SIZE(prefix);
    memcpy(self->cookie_head, PyBytes_AS_STRING(ef_head), self->ef_head_len);
    memcpy(self->cookie_head + self->ef_head_len, PyBytes_AS_STRING(prefix), self->prefix_len);
    self->plain_len = (size_t)PyBytes_GET_SIZE(plain);
    self->plain = PyMem_Malloc(self->plain_len ? self->plain_len : 1);
    if (self->plain == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    memcpy(self->plain, PyBytes_AS_STRING(plain), self->plain_len);
    self->cookie_pad = (size_t)cookie_pad;
    self->nonce_len = (size_t)nonce_len;
    self->nonce_pad = (size_t)nonce_pad;
    self->cookie_field = self->ef_head_len + self->prefix_len + NTS_COOKIE_NONCE + BLOCK
                         + self->plain_len + self->cookie_pad;
    Py_INCREF(c2s);
    Py_INCREF(s2c);
    Py_INCREF(master);
    self->c2s = (AesSivObject *)c2s;
    self->s2c = (AesSivObject *)s2c;
    self->master = (AesSivObject *)master;
    return (PyObject *)self;
}

/* The response: header, unique id field, then the authenticator sealing
 * ``count`` new cookies; NULL with an exception. ``limit``: the longest
 * response allowed (its request's length: no amplification). */
static PyObject *
build(NtsPlanObject *p, PyObject *header, const unsigned char *uid, size_t uid_len,
      size_t count, PyObject *random, size_t limit)
{
    if (!short_bytes(header, "header", NTS_HEADER_LEN, NTS_HEADER_LEN)
        || !short_bytes(random, "random", 0, PY_SSIZE_T_MAX))
        return NULL;
    if ((size_t)PyBytes_GET_SIZE(random) != count * NTS_COOKIE_NONCE + p->nonce_len) {
        PyErr_SetString(PyExc_ValueError, "random must hold 16 bytes per cookie and the nonce");
        return NULL;
    }
    size_t cookies_len = count * p->cookie_field;
    size_t ct_len = BLOCK + cookies_len;
    size_t head_len = NTS_HEADER_LEN + uid_len;
    size_t total = head_len + NTS_AUTH_HEAD + p->nonce_len + p->nonce_pad + ct_len
                   + p->tail[count];
    if (total > limit) {
        /* the plan sizes ``count`` so that this never happens: a response
         * longer than its request would make the server an amplifier */
        PyErr_SetString(PyExc_ValueError, "the response would be longer than the request");
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (out == NULL)
        return NULL;
    unsigned char *cookies = cookies_len ? PyMem_Malloc(cookies_len) : NULL;
    if (cookies_len && cookies == NULL) {
        Py_DECREF(out);
        return PyErr_NoMemory();
    }
    const unsigned char *rnd = (const unsigned char *)PyBytes_AS_STRING(random);
    unsigned char *o = (unsigned char *)PyBytes_AS_STRING(out);
    size_t head = p->ef_head_len + p->prefix_len;
    int ok = 1;

    /* The cookie fields: EF header and prefix, nonce, SIV and ciphertext, padding. */
    for (size_t i = 0; ok && i < count; i++) {
        unsigned char *c = cookies + i * p->cookie_field;
        const unsigned char *cnonce = rnd + i * NTS_COOKIE_NONCE;
        Piece ads[2] = {{p->cookie_head + p->ef_head_len, p->prefix_len},
                        {cnonce, NTS_COOKIE_NONCE}};
        memcpy(c, p->cookie_head, head);
        memcpy(c + head, cnonce, NTS_COOKIE_NONCE);
        unsigned char *siv = c + head + NTS_COOKIE_NONCE;
        ok = s2v(p->master, ads, 2, p->plain, p->plain_len, siv)
             && ctr_xor(p->master, siv, p->plain, p->plain_len, siv + BLOCK);
        memset(siv + BLOCK + p->plain_len, 0, p->cookie_pad);
    }

    /* The packet so far (the associated data), then the authenticator. */
    memcpy(o, PyBytes_AS_STRING(header), NTS_HEADER_LEN);
    memcpy(o + NTS_HEADER_LEN, uid, uid_len);
    unsigned char *a = o + head_len;
    memcpy(a, p->auth_head[count], NTS_AUTH_HEAD);
    const unsigned char *nonce = rnd + count * NTS_COOKIE_NONCE;
    memcpy(a + NTS_AUTH_HEAD, nonce, p->nonce_len);
    memset(a + NTS_AUTH_HEAD + p->nonce_len, 0, p->nonce_pad);
    unsigned char *ct = a + NTS_AUTH_HEAD + p->nonce_len + p->nonce_pad;
    if (ok) {
        Piece ads[2] = {{o, head_len}, {nonce, p->nonce_len}};
        ok = s2v(p->s2c, ads, 2, cookies, cookies_len, ct)
             && ctr_xor(p->s2c, ct, cookies, cookies_len, ct + BLOCK);
    }
    memset(ct + ct_len, 0, p->tail[count]);
    if (cookies != NULL) {
        wipe(cookies, cookies_len);
        PyMem_Free(cookies);
    }
    if (!ok) {
        Py_DECREF(out);
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL AES operation failed");
        return NULL;
    }
    return out;
}

PyDoc_STRVAR(NtsPlan_seal_doc,
"seal(header, unique_id_field, count, random, limit, /) -> bytes\n\n"
"The response: ``header`` (48 bytes), ``unique_id_field`` (the unique\n"
"identifier EF as it goes out), then the authenticator sealing ``count``\n"
"(0-8) new cookies. ``random``: 16 bytes per cookie nonce, then the\n"
"authenticator's nonce. ValueError if it would be longer than ``limit``.");

static PyObject *
NtsPlan_seal(NtsPlanObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "seal() takes 5 arguments (%zd given)", nargs);
        return NULL;
    }
    Py_ssize_t count, limit;
    if (!short_bytes(args[1], "unique_id_field", 0, NTS_MAX_FIELD)
        || (count = bounded(args[2], "count", 0, NTS_MAX_COOKIES)) < 0
        || (limit = bounded(args[4], "limit", 0, PY_SSIZE_T_MAX)) < 0)
        return NULL;
    return build(self, args[0], (const unsigned char *)PyBytes_AS_STRING(args[1]),
                 (size_t)PyBytes_GET_SIZE(args[1]), (size_t)count, args[3], (size_t)limit);
}

PyDoc_STRVAR(NtsPlan_answer_doc,
"answer(request, header, count, random, uid_end, auth_at, nonce_start, nonce_end,\n"
"       ct_start, ct_end, /) -> bytes | None\n\n"
"The response to ``request`` (as seal() with request[48:uid_end] as the unique\n"
"id field and len(request) as the limit), or None when its authenticator\n"
"(nonce request[nonce_start:nonce_end], ciphertext request[ct_start:ct_end],\n"
"everything before auth_at associated data) does not verify under C2S.");

static PyObject *
NtsPlan_answer(NtsPlanObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 10) {
        PyErr_Format(PyExc_TypeError, "answer() takes 10 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *request = args[0];
    if (!short_bytes(request, "request", NTS_HEADER_LEN, 65536))
        return NULL;
    Py_ssize_t n = PyBytes_GET_SIZE(request), at[6], count;
    if ((count = bounded(args[2], "count", 0, NTS_MAX_COOKIES)) < 0)
        return NULL;
    for (int i = 0; i < 6; i++) {
        if ((at[i] = bounded(args[4 + i], "an offset", 0, n)) < 0)
            return NULL;
    }
    size_t uid_end = (size_t)at[0], auth_at = (size_t)at[1], nonce_start = (size_t)at[2];
    size_t nonce_end = (size_t)at[3], ct_start = (size_t)at[4], ct_end = (size_t)at[5];
    /* Bounds only (the memory this reads): in order, inside the request. */
    if (uid_end < NTS_HEADER_LEN || uid_end > auth_at || auth_at > nonce_start
        || nonce_start > nonce_end || nonce_end > ct_start || ct_start > ct_end) {
        PyErr_SetString(PyExc_ValueError, "offsets out of order");
        return NULL;
    }
    if (ct_end - ct_start < BLOCK)
        Py_RETURN_NONE; /* too short to hold the SIV: cannot verify */
    const unsigned char *req = (const unsigned char *)PyBytes_AS_STRING(request);
    /* RFC 8915 s5.7: everything before the authenticator is associated data,
     * the nonce comes last. The request's encrypted part is decrypted only
     * to check it: a request the plan answers carries nothing in it. */
    size_t plen = ct_end - ct_start - BLOCK;
    unsigned char v[BLOCK], *scratch = PyMem_Malloc(plen ? plen : 1);
    if (scratch == NULL)
        return PyErr_NoMemory();
    Piece ads[2] = {{req, auth_at}, {req + nonce_start, nonce_end - nonce_start}};
    int fine = ctr_xor(self->c2s, req + ct_start, req + ct_start + BLOCK, plen, scratch)
               && s2v(self->c2s, ads, 2, scratch, plen, v);
    int match = fine && CRYPTO_memcmp(v, req + ct_start, BLOCK) == 0;
    wipe(scratch, plen ? plen : 1);
    wipe(v, BLOCK);
    PyMem_Free(scratch);
    if (!fine) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL AES operation failed");
        return NULL;
    }
    if (!match)
        Py_RETURN_NONE;
    return build(self, args[1], req + NTS_HEADER_LEN, uid_end - NTS_HEADER_LEN, (size_t)count,
                 args[3], (size_t)n);
}

static PyMethodDef NtsPlan_methods[] = {
    {"seal", (PyCFunction)(void (*)(void))NtsPlan_seal, METH_FASTCALL, NtsPlan_seal_doc},
    {"answer", (PyCFunction)(void (*)(void))NtsPlan_answer, METH_FASTCALL, NtsPlan_answer_doc},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(NtsPlan_doc,
"NtsPlan(c2s, s2c, master, cookie_ef_head, cookie_prefix, cookie_plain, cookie_pad,\n"
"        nonce_len, nonce_pad, auth_heads, tails)\n\n"
"One session's response template, checked once (see proto/nts.py's\n"
"ResponsePlan, which makes it): the session's AesSiv keys and the master key\n"
"new cookies are sealed under; a cookie field is cookie_ef_head |\n"
"cookie_prefix | nonce (16) | master.seal(nonce, cookie_plain, ad=prefix)\n"
"| cookie_pad zeros (proto/cookies.py's format); the authenticator is\n"
"auth_heads[count] | nonce | nonce_pad zeros | ciphertext | tails[count] zeros.");

static PyTypeObject NtsPlanType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ntspy._accel.NtsPlan",
    .tp_basicsize = sizeof(NtsPlanObject),
    .tp_dealloc = (destructor)NtsPlan_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = NtsPlan_doc,
    .tp_methods = NtsPlan_methods,
    .tp_new = NtsPlan_new,
};

int
accel_nts_init(PyObject *module)
{
    return accel_add_type(module, "NtsPlan", &NtsPlanType);
}
