/*
 * ntspy._accel: AES-SIV-CMAC (RFC 5297) that keeps its key schedules between
 * calls, for the NTS server's packet path.
 *
 * Why not OpenSSL's own "AES-128-SIV" cipher: in OpenSSL 3.0 it cannot be
 * re-used without handing it the key again (a full key schedule and CMAC
 * setup per call, ~2.4 us, slower than `cryptography`), and it produces no
 * tag for an empty plaintext, which is exactly what an NTS client request
 * carries. So S2V and CTR are built here from two plain OpenSSL contexts
 * that are keyed once per object: AES-CBC under K1 (CMAC is a CBC-MAC with
 * a tweaked last block) and AES-CTR under K2. The block cipher itself stays
 * OpenSSL's (AES-NI where the CPU has it).
 *
 * The module is optional: ntspy.proto.aead falls back to `cryptography` when
 * it cannot be imported, and tests check both give the same bytes.
 *
 * It also carries recv_batch/send_batch (recvmmsg/sendmmsg) for the UDP
 * server loop in net/udp.py; see the section near the end.
 *
 * Every call holds the GIL: one NTS packet costs well under a microsecond
 * here, less than releasing and re-taking the GIL would, and holding it also
 * serialises the use of the object's cipher contexts.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <limits.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#define BLOCK 16
/* RFC 5297 s2.6 / s7: at most 126 associated-data components. */
#define MAX_COMPONENTS 126
/* Inputs up to 1 GiB: far beyond any NTS packet, and every length stays an int
 * for the EVP calls. */
#define SIV_MAX_INPUT (1 << 30)
/* CBC-MAC output we throw away is written here, this many bytes at a time. */
#define SCRATCH 512

static PyObject *InvalidTag;

/* Fetched once at import: EVP_CIPHER_fetch is not free, and new sessions
 * (a new client key) appear at run time. Index: key length / 16 - 2. */
static EVP_CIPHER *cbc_ciphers[3];
static EVP_CIPHER *ctr_ciphers[3];

typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *mac; /* AES-CBC under K1, no padding: CMAC */
    EVP_CIPHER_CTX *ctr; /* AES-CTR under K2 */
    unsigned char sub1[BLOCK]; /* CMAC subkeys (RFC 4493 s2.3) */
    unsigned char sub2[BLOCK];
    unsigned char d0[BLOCK]; /* CMAC(K1, zero block): where S2V starts */
    unsigned char chain[BLOCK]; /* the CBC context's chaining value (see cbc_feed) */
    int key_len;
    int broken; /* the CBC context could not be reset: refuse to work */
} AesSivObject;

typedef struct {
    const unsigned char *buf;
    size_t len;
} Piece;

/* Doubling in GF(2^128), RFC 5297 s2.3, without a branch on secret bits. */
static void
dbl(unsigned char b[BLOCK])
{
    unsigned char carry = (unsigned char)(b[0] >> 7);
    for (int i = 0; i < BLOCK - 1; i++)
        b[i] = (unsigned char)((b[i] << 1) | (b[i + 1] >> 7));
    b[BLOCK - 1] = (unsigned char)((b[BLOCK - 1] << 1) ^ ((0u - carry) & 0x87));
}

static void
xor_into(unsigned char *dst, const unsigned char *src, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] ^= src[i];
}

/* The CBC context is keyed and given a zero IV once; after that it is never
 * re-initialised (an EVP init costs more than the AES work for a packet).
 * OpenSSL chains each block on the last ciphertext block it produced, which
 * is kept in s->chain: to continue a CBC-MAC from our own chain value x
 * instead, the first block fed is xored with (x ^ s->chain). */
static int
cbc_feed(AesSivObject *s, unsigned char x[BLOCK], const unsigned char *data, size_t len,
         unsigned char *out_last)
{
    unsigned char scratch[SCRATCH];
    size_t n = 0;
    int outl, ok = 1, first = 1;

    while (len > 0) {
        const unsigned char *in = data;
        n = len < SCRATCH ? len : SCRATCH;
        if (first) {
            /* only the first block changes; the rest of this chunk is
             * encrypted straight from the caller's buffer below */
            unsigned char blk[BLOCK];
            for (int i = 0; i < BLOCK; i++)
                blk[i] = (unsigned char)(data[i] ^ x[i] ^ s->chain[i]);
            ok = EVP_EncryptUpdate(s->mac, scratch, &outl, blk, BLOCK) && outl == BLOCK;
            OPENSSL_cleanse(blk, BLOCK);
            first = 0;
            if (!ok)
                break;
            if (n == BLOCK) {
                data += n;
                len -= n;
                continue;
            }
            in = data + BLOCK;
            n -= BLOCK;
            data += BLOCK;
            len -= BLOCK;
        }
        if (!EVP_EncryptUpdate(s->mac, scratch, &outl, in, (int)n) || outl != (int)n) {
            ok = 0;
            break;
        }
        data += n;
        len -= n;
    }
    if (ok && (n >= BLOCK)) {
        memcpy(s->chain, scratch + n - BLOCK, BLOCK);
        memcpy(x, s->chain, BLOCK);
        if (out_last != NULL)
            memcpy(out_last, s->chain, BLOCK);
    } else if (!ok) {
        /* Resynchronise: back to a zero IV, as at construction. */
        memset(s->chain, 0, BLOCK);
        if (!EVP_EncryptInit_ex(s->mac, NULL, NULL, NULL, s->chain))
            s->broken = 1;
    }
    OPENSSL_cleanse(scratch, sizeof scratch);
    return ok && !s->broken;
}

/* x <- CBC-MAC chain continued over len bytes (a multiple of 16). */
static int
cbc_absorb(AesSivObject *s, unsigned char x[BLOCK], const unsigned char *data, size_t len)
{
    if (len == 0)
        return 1;
    return cbc_feed(s, x, data, len, NULL);
}

/* out <- E(K1, x ^ last block), the last block padded and tweaked as CMAC says. */
static int
cmac_last(AesSivObject *s, unsigned char x[BLOCK], const unsigned char *tail,
          size_t tail_len, unsigned char out[BLOCK])
{
    unsigned char blk[BLOCK];
    int ok;

    memset(blk, 0, BLOCK);
    if (tail_len > 0)
        memcpy(blk, tail, tail_len);
    if (tail_len == BLOCK) {
        xor_into(blk, s->sub1, BLOCK);
    } else {
        blk[tail_len] = 0x80;
        xor_into(blk, s->sub2, BLOCK);
    }
    ok = cbc_feed(s, x, blk, BLOCK, out);
    OPENSSL_cleanse(blk, BLOCK);
    return ok;
}

/* AES-CMAC(K1, m), RFC 4493. */
static int
cmac(AesSivObject *s, const unsigned char *m, size_t len, unsigned char out[BLOCK])
{
    unsigned char x[BLOCK];
    size_t last = len == 0 ? 0 : (len % BLOCK ? len % BLOCK : BLOCK);
    int ok;

    memset(x, 0, BLOCK);
    ok = cbc_absorb(s, x, m, len - last) && cmac_last(s, x, m + len - last, last, out);
    OPENSSL_cleanse(x, BLOCK);
    return ok;
}

/* S2V (RFC 5297 s2.4) over the associated-data pieces, then the plaintext. */
static int
s2v(AesSivObject *s, const Piece *ads, Py_ssize_t n_ads, const unsigned char *p, size_t plen,
    unsigned char v[BLOCK])
{
    unsigned char d[BLOCK], mac[BLOCK], x[BLOCK], tail[2 * BLOCK];
    int ok = 1;

    memcpy(d, s->d0, BLOCK);
    for (Py_ssize_t i = 0; ok && i < n_ads; i++) {
        dbl(d);
        ok = cmac(s, ads[i].buf, ads[i].len, mac);
        xor_into(d, mac, BLOCK);
    }
    if (!ok)
        goto done;
    if (plen >= BLOCK) {
        /* CMAC(P xorend D), streamed: the 16 bytes D touches lie in the
         * last CMAC block and (when the last block is partial) the one
         * before, so only those are copied and changed. */
        size_t last = plen % BLOCK ? plen % BLOCK : BLOCK;
        size_t start = plen - last; /* of the last CMAC block */
        size_t before = start >= BLOCK ? start - BLOCK : 0;
        size_t tail_len = plen - before; /* 16 .. 32 */

        memcpy(tail, p + before, tail_len);
        xor_into(tail + tail_len - BLOCK, d, BLOCK);
        memset(x, 0, BLOCK);
        ok = cbc_absorb(s, x, p, before);
        if (ok && tail_len > BLOCK) {
            ok = cbc_absorb(s, x, tail, BLOCK);
            ok = ok && cmac_last(s, x, tail + BLOCK, tail_len - BLOCK, v);
        } else if (ok) {
            ok = cmac_last(s, x, tail, BLOCK, v);
        }
    } else {
        /* CMAC(dbl(D) xor pad(P)): one complete block. */
        dbl(d);
        memset(tail, 0, BLOCK);
        if (plen > 0)
            memcpy(tail, p, plen);
        tail[plen] = 0x80;
        xor_into(d, tail, BLOCK);
        memset(x, 0, BLOCK);
        ok = cmac_last(s, x, d, BLOCK, v);
    }
done:
    OPENSSL_cleanse(d, BLOCK);
    OPENSSL_cleanse(mac, BLOCK);
    OPENSSL_cleanse(x, BLOCK);
    OPENSSL_cleanse(tail, sizeof tail);
    return ok;
}

/* out <- in XOR AES-CTR(K2, V with the two bits RFC 5297 s2.5 clears). */
static int
ctr_xor(AesSivObject *s, const unsigned char v[BLOCK], const unsigned char *in, size_t len,
        unsigned char *out)
{
    unsigned char q[BLOCK];
    int outl, ok;

    if (len == 0)
        return 1;
    memcpy(q, v, BLOCK);
    q[8] &= 0x7f;
    q[12] &= 0x7f;
    ok = EVP_EncryptInit_ex(s->ctr, NULL, NULL, NULL, q)
         && EVP_EncryptUpdate(s->ctr, out, &outl, in, (int)len) && outl == (int)len;
    OPENSSL_cleanse(q, BLOCK);
    return ok;
}

static PyObject *
seal_pieces(AesSivObject *s, const Piece *ads, Py_ssize_t n_ads, const Py_buffer *pt)
{
    PyObject *result;
    unsigned char *out;

    if (pt->len > SIV_MAX_INPUT) {
        PyErr_SetString(PyExc_ValueError, "plaintext too long");
        return NULL;
    }
    result = PyBytes_FromStringAndSize(NULL, BLOCK + pt->len);
    if (result == NULL)
        return NULL;
    out = (unsigned char *)PyBytes_AS_STRING(result);
    if (!s2v(s, ads, n_ads, pt->buf, (size_t)pt->len, out)
        || !ctr_xor(s, out, pt->buf, (size_t)pt->len, out + BLOCK)) {
        Py_DECREF(result);
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL AES operation failed");
        return NULL;
    }
    return result;
}

static PyObject *
open_pieces(AesSivObject *s, const Piece *ads, Py_ssize_t n_ads, const Py_buffer *ct)
{
    PyObject *result;
    unsigned char v[BLOCK], *plain;
    size_t plen;
    int ok;

    if (ct->len < BLOCK || ct->len > SIV_MAX_INPUT + BLOCK) {
        PyErr_SetString(InvalidTag, "ciphertext too short or too long");
        return NULL;
    }
    plen = (size_t)ct->len - BLOCK;
    result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)plen);
    if (result == NULL)
        return NULL;
    plain = (unsigned char *)PyBytes_AS_STRING(result);
    ok = ctr_xor(s, ct->buf, (const unsigned char *)ct->buf + BLOCK, plen, plain)
         && s2v(s, ads, n_ads, plain, plen, v);
    if (!ok) {
        OPENSSL_cleanse(plain, plen);
        Py_DECREF(result);
        OPENSSL_cleanse(v, BLOCK);
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL AES operation failed");
        return NULL;
    }
    /* Constant time: how much of a forged tag was right must not show. */
    ok = CRYPTO_memcmp(v, ct->buf, BLOCK) == 0;
    OPENSSL_cleanse(v, BLOCK);
    if (!ok) {
        OPENSSL_cleanse(plain, plen);
        Py_DECREF(result);
        PyErr_SetString(InvalidTag, "AES-SIV tag mismatch");
        return NULL;
    }
    return result;
}

/* --- the AesSiv type --------------------------------------------------------- */

static void
AesSiv_dealloc(AesSivObject *self)
{
    EVP_CIPHER_CTX_free(self->mac); /* frees and cleanses the key schedules */
    EVP_CIPHER_CTX_free(self->ctr);
    OPENSSL_cleanse(self->sub1, BLOCK);
    OPENSSL_cleanse(self->sub2, BLOCK);
    OPENSSL_cleanse(self->d0, BLOCK);
    OPENSSL_cleanse(self->chain, BLOCK);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
AesSiv_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"key", NULL};
    Py_buffer key;
    AesSivObject *self = NULL;
    unsigned char zero[BLOCK], l[BLOCK];
    int half, idx, outl, ok;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*:AesSiv", kwlist, &key))
        return NULL;
    if (key.len != 32 && key.len != 48 && key.len != 64) {
        PyErr_Format(PyExc_ValueError, "AES-SIV needs a 32-, 48- or 64-byte key, got %zd",
                     key.len);
        goto fail;
    }
    half = (int)key.len / 2;
    idx = half / 8 - 2;
    if (cbc_ciphers[idx] == NULL || ctr_ciphers[idx] == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "this OpenSSL lacks the AES modes needed");
        goto fail;
    }
    self = (AesSivObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        goto fail;
    self->key_len = (int)key.len;
    self->mac = EVP_CIPHER_CTX_new();
    self->ctr = EVP_CIPHER_CTX_new();
    memset(zero, 0, BLOCK);
    /* RFC 5297 s2.6: the left half keys S2V (CMAC), the right half CTR. */
    ok = self->mac != NULL && self->ctr != NULL
         && EVP_EncryptInit_ex2(self->mac, cbc_ciphers[idx], key.buf, zero, NULL)
         && EVP_CIPHER_CTX_set_padding(self->mac, 0)
         && EVP_EncryptInit_ex2(self->ctr, ctr_ciphers[idx], (const unsigned char *)key.buf + half,
                                zero, NULL);
    if (ok) {
        /* CMAC subkeys from L = E(K1, 0), RFC 4493 s2.3. */
        ok = EVP_EncryptUpdate(self->mac, l, &outl, zero, BLOCK) && outl == BLOCK;
        memcpy(self->chain, l, BLOCK); /* what the CBC context now chains on */
        memcpy(self->sub1, l, BLOCK);
        dbl(self->sub1);
        memcpy(self->sub2, self->sub1, BLOCK);
        dbl(self->sub2);
        ok = ok && cmac(self, zero, BLOCK, self->d0);
        OPENSSL_cleanse(l, BLOCK);
    }
    if (!ok) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL could not set up AES");
        goto fail;
    }
    PyBuffer_Release(&key);
    return (PyObject *)self;
fail:
    Py_XDECREF(self);
    PyBuffer_Release(&key);
    return NULL;
}

PyDoc_STRVAR(seal_doc,
"seal(nonce, plaintext, associated_data) -> bytes\n\n"
"AES-SIV with the associated data and then the nonce as the two components\n"
"(RFC 8915 s5.6); returns the 16-byte SIV followed by the ciphertext.");

static PyObject *
AesSiv_seal(AesSivObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer nonce, pt, ad;
    Piece ads[2];
    PyObject *result;

    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "seal() takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &nonce, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &pt, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&nonce);
        return NULL;
    }
    if (PyObject_GetBuffer(args[2], &ad, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&nonce);
        PyBuffer_Release(&pt);
        return NULL;
    }
    ads[0].buf = ad.buf;
    ads[0].len = (size_t)ad.len;
    ads[1].buf = nonce.buf;
    ads[1].len = (size_t)nonce.len;
    result = seal_pieces(self, ads, 2, &pt);
    PyBuffer_Release(&nonce);
    PyBuffer_Release(&pt);
    PyBuffer_Release(&ad);
    return result;
}

PyDoc_STRVAR(open_doc,
"open(nonce, ciphertext, associated_data) -> bytes\n\n"
"The inverse of seal(); raises InvalidTag when the input does not verify\n"
"(also when it is shorter than the 16-byte SIV).");

static PyObject *
AesSiv_open(AesSivObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer nonce, ct, ad;
    Piece ads[2];
    PyObject *result;

    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "open() takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &nonce, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &ct, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&nonce);
        return NULL;
    }
    if (PyObject_GetBuffer(args[2], &ad, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&nonce);
        PyBuffer_Release(&ct);
        return NULL;
    }
    ads[0].buf = ad.buf;
    ads[0].len = (size_t)ad.len;
    ads[1].buf = nonce.buf;
    ads[1].len = (size_t)nonce.len;
    result = open_pieces(self, ads, 2, &ct);
    PyBuffer_Release(&nonce);
    PyBuffer_Release(&ct);
    PyBuffer_Release(&ad);
    return result;
}

/* encrypt/decrypt with any list of components, like cryptography's AESSIV:
 * for the RFC 5297 vectors and for callers outside NTS. */
static int
get_pieces(PyObject *seq, Py_buffer *views, Piece *pieces, Py_ssize_t *count)
{
    PyObject *fast;
    Py_ssize_t n;

    *count = 0;
    if (seq == Py_None)
        return 1;
    fast = PySequence_Fast(seq, "associated_data must be a sequence of bytes");
    if (fast == NULL)
        return 0;
    n = PySequence_Fast_GET_SIZE(fast);
    if (n > MAX_COMPONENTS) {
        Py_DECREF(fast);
        PyErr_SetString(PyExc_ValueError, "too many associated data items (at most 126)");
        return 0;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, i), &views[i], PyBUF_SIMPLE) < 0) {
            for (Py_ssize_t j = 0; j < i; j++)
                PyBuffer_Release(&views[j]);
            Py_DECREF(fast);
            return 0;
        }
        pieces[i].buf = views[i].buf;
        pieces[i].len = (size_t)views[i].len;
    }
    Py_DECREF(fast);
    *count = n;
    return 1;
}

static PyObject *
general(AesSivObject *self, PyObject *args, int enc)
{
    Py_buffer data, views[MAX_COMPONENTS];
    Piece pieces[MAX_COMPONENTS];
    PyObject *seq = Py_None, *result;
    Py_ssize_t n;

    if (!PyArg_ParseTuple(args, enc ? "y*|O:encrypt" : "y*|O:decrypt", &data, &seq))
        return NULL;
    if (!get_pieces(seq, views, pieces, &n)) {
        PyBuffer_Release(&data);
        return NULL;
    }
    result = enc ? seal_pieces(self, pieces, n, &data) : open_pieces(self, pieces, n, &data);
    for (Py_ssize_t i = 0; i < n; i++)
        PyBuffer_Release(&views[i]);
    PyBuffer_Release(&data);
    return result;
}

PyDoc_STRVAR(encrypt_doc,
"encrypt(plaintext, associated_data=None) -> bytes\n\n"
"AES-SIV over a list of associated-data components (RFC 5297 s3).");

static PyObject *
AesSiv_encrypt(AesSivObject *self, PyObject *args)
{
    return general(self, args, 1);
}

PyDoc_STRVAR(decrypt_doc,
"decrypt(ciphertext, associated_data=None) -> bytes\n\n"
"The inverse of encrypt(); raises InvalidTag when the input does not verify.");

static PyObject *
AesSiv_decrypt(AesSivObject *self, PyObject *args)
{
    return general(self, args, 0);
}

static PyObject *
AesSiv_key_length(AesSivObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromLong(self->key_len);
}

static PyMethodDef AesSiv_methods[] = {
    {"seal", (PyCFunction)(void (*)(void))AesSiv_seal, METH_FASTCALL, seal_doc},
    {"open", (PyCFunction)(void (*)(void))AesSiv_open, METH_FASTCALL, open_doc},
    {"encrypt", (PyCFunction)AesSiv_encrypt, METH_VARARGS, encrypt_doc},
    {"decrypt", (PyCFunction)AesSiv_decrypt, METH_VARARGS, decrypt_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef AesSiv_getset[] = {
    {"key_length", (getter)AesSiv_key_length, NULL, "Key length in bytes (32, 48 or 64).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(AesSiv_doc,
"AesSiv(key)\n\n"
"AES-SIV-CMAC with a 32-, 48- or 64-byte key (AEAD ids 15, 16, 17), keyed\n"
"once: every call re-uses the key schedules.");

static PyTypeObject AesSivType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ntspy._accel.AesSiv",
    .tp_basicsize = sizeof(AesSivObject),
    .tp_dealloc = (destructor)AesSiv_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = AesSiv_doc,
    .tp_methods = AesSiv_methods,
    .tp_getset = AesSiv_getset,
    .tp_new = AesSiv_new,
};

/* ------------------------------------------------------------------------
 * An NTS response (responder.py's fast path) in one call: the request's
 * authenticator verified under the session's C2S key, new cookies sealed
 * under the master key, then the encrypted part sealed under the session's
 * S2C key, laid out exactly as proto/nts.py's encode_authenticator lays it
 * out. The Python fast path decides everything else (the layout, which
 * session, how many cookies, the header, the random bytes); this saves the
 * per-cookie and per-part Python objects.
 * ------------------------------------------------------------------------ */

#define NTS_HEADER_LEN 48
#define NTS_COOKIE_NONCE 16
#define NTS_MAX_COOKIES 8
#define NTS_AUTHENTICATOR 0x0404
#define NTS_MAX_FIELD 1024 /* any one of the byte strings below: far above real sizes */

static int
small_bytes(PyObject *obj, const char *what, Py_ssize_t min, Py_ssize_t max)
{
    if (!PyBytes_CheckExact(obj)) {
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

static int
small_int(PyObject *obj, const char *what, long min, long max, size_t *out)
{
    long v = PyLong_Check(obj) ? PyLong_AsLong(obj) : -1;
    if (v == -1 && PyErr_Occurred())
        return 0;
    if (!PyLong_Check(obj) || v < min || v > max) {
        PyErr_Format(PyExc_ValueError, "%s out of range", what);
        return 0;
    }
    *out = (size_t)v;
    return 1;
}

static void
put16(unsigned char *p, size_t v)
{
    p[0] = (unsigned char)(v >> 8);
    p[1] = (unsigned char)v;
}

PyDoc_STRVAR(nts_reply_doc,
"nts_reply(request, header, layout, session, count, random, /) -> bytes | None\n\n"
"The NTS response to ``request``, or None when its authenticator does not\n"
"verify under the session's C2S key. ``layout`` is responder._parse_nts's\n"
"tuple of offsets (unique id end, cookie start and end, placeholders,\n"
"authenticator start, nonce end, ciphertext start and end). The response:\n"
"``header`` (48 bytes), the request's unique identifier field, then the\n"
"authenticator sealing ``count`` new cookies under the S2C key. ``session``\n"
"is (c2s, s2c, master, nonce_len, sealable, cookie_head, cookie_pad,\n"
"nonce_pad, auth_fixed, auth_extra): the session's keys, the master key that\n"
"seals the cookies (with its key id, bytes 4..8 of cookie_head, as associated\n"
"data), the plaintext of a new cookie, the cookie field header, the padding\n"
"and the authenticator length without the ciphertext. ``random`` holds 16\n"
"bytes per cookie nonce, then the authenticator nonce.");

static PyObject *
accel_nts_reply(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_Format(PyExc_TypeError, "nts_reply() takes 6 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *request = args[0], *header = args[1], *layout = args[2], *session = args[3];
    size_t count, nonce_len, auth_fixed, at[8];
    if (!small_bytes(request, "request", NTS_HEADER_LEN, 65536)
        || !small_bytes(header, "header", NTS_HEADER_LEN, NTS_HEADER_LEN)
        || !small_int(args[4], "count", 0, NTS_MAX_COOKIES, &count))
        return NULL;
    if (!PyTuple_CheckExact(layout) || PyTuple_GET_SIZE(layout) != 8) {
        PyErr_SetString(PyExc_TypeError, "layout must be a tuple of 8");
        return NULL;
    }
    long req_len = (long)PyBytes_GET_SIZE(request);
    for (int i = 0; i < 8; i++) {
        if (!small_int(PyTuple_GET_ITEM(layout, i), "a layout offset", 0, req_len, &at[i]))
            return NULL;
    }
    size_t uid_end = at[0], auth_at = at[4], nonce_at = auth_at + 8, nonce_end = at[5];
    size_t ct_start = at[6], ct_end = at[7];
    /* The offsets must describe this request: header, unique id, ..., an
     * authenticator whose nonce and ciphertext lie inside it. */
    if (uid_end < NTS_HEADER_LEN || uid_end > auth_at || nonce_at > nonce_end
        || nonce_end > ct_start || ct_start > ct_end) {
        PyErr_SetString(PyExc_ValueError, "layout does not fit the request");
        return NULL;
    }
    if (ct_end - ct_start < BLOCK)
        Py_RETURN_NONE; /* too short to hold the SIV: cannot verify */
    if (!PyTuple_CheckExact(session) || PyTuple_GET_SIZE(session) != 10) {
        PyErr_SetString(PyExc_TypeError, "session must be a tuple of 10");
        return NULL;
    }
    PyObject *c2s = PyTuple_GET_ITEM(session, 0);
    PyObject *s2c = PyTuple_GET_ITEM(session, 1);
    PyObject *master_obj = PyTuple_GET_ITEM(session, 2);
    PyObject *sealable = PyTuple_GET_ITEM(session, 4);
    PyObject *cookie_head = PyTuple_GET_ITEM(session, 5);
    PyObject *cookie_pad = PyTuple_GET_ITEM(session, 6);
    PyObject *nonce_pad = PyTuple_GET_ITEM(session, 7);
    PyObject *auth_extra = PyTuple_GET_ITEM(session, 9);
    if (!PyObject_TypeCheck(c2s, &AesSivType) || !PyObject_TypeCheck(s2c, &AesSivType)
        || !PyObject_TypeCheck(master_obj, &AesSivType)) {
        PyErr_SetString(PyExc_TypeError, "the session's keys must be AesSiv objects");
        return NULL;
    }
    if (!small_int(PyTuple_GET_ITEM(session, 3), "nonce_len", 1, NTS_MAX_FIELD, &nonce_len)
        || !small_bytes(sealable, "sealable", 0, NTS_MAX_FIELD)
        || !small_bytes(cookie_head, "cookie_head", 8, 8)
        || !small_bytes(cookie_pad, "cookie_pad", 0, NTS_MAX_FIELD)
        || !small_bytes(nonce_pad, "nonce_pad", 0, NTS_MAX_FIELD)
        || !small_int(PyTuple_GET_ITEM(session, 8), "auth_fixed", 0, NTS_MAX_FIELD, &auth_fixed)
        || !small_bytes(auth_extra, "auth_extra", 0, NTS_MAX_FIELD)
        || !small_bytes(args[5], "random", 0, NTS_MAX_COOKIES * NTS_COOKIE_NONCE + NTS_MAX_FIELD))
        return NULL;
    if ((size_t)PyBytes_GET_SIZE(args[5]) != count * NTS_COOKIE_NONCE + nonce_len) {
        PyErr_SetString(PyExc_ValueError, "random must hold 16 bytes per cookie and the nonce");
        return NULL;
    }

    const unsigned char *req = (const unsigned char *)PyBytes_AS_STRING(request);

    /* The request first: RFC 8915 s5.7, everything before the authenticator
     * is associated data, the nonce comes last. A client request's encrypted
     * part is read only to check it (as responder.py does: it carries nothing
     * the server uses). */
    {
        size_t plen = ct_end - ct_start - BLOCK;
        unsigned char v[BLOCK], *scratch = PyMem_Malloc(plen ? plen : 1);
        if (scratch == NULL)
            return PyErr_NoMemory();
        Piece ads[2] = {{req, auth_at}, {req + nonce_at, nonce_end - nonce_at}};
        AesSivObject *k = (AesSivObject *)c2s;
        int fine = ctr_xor(k, req + ct_start, req + ct_start + BLOCK, plen, scratch)
                   && s2v(k, ads, 2, scratch, plen, v);
        int match = fine && CRYPTO_memcmp(v, req + ct_start, BLOCK) == 0;
        OPENSSL_cleanse(scratch, plen ? plen : 1);
        OPENSSL_cleanse(v, BLOCK);
        PyMem_Free(scratch);
        if (!fine) {
            PyErr_SetString(PyExc_RuntimeError, "OpenSSL AES operation failed");
            return NULL;
        }
        if (!match)
            Py_RETURN_NONE;
    }

    const unsigned char *rnd = (const unsigned char *)PyBytes_AS_STRING(args[5]);
    const unsigned char *head = (const unsigned char *)PyBytes_AS_STRING(cookie_head);
    size_t plain_len = (size_t)PyBytes_GET_SIZE(sealable);
    size_t pad_len = (size_t)PyBytes_GET_SIZE(cookie_pad);
    size_t nonce_pad_len = (size_t)PyBytes_GET_SIZE(nonce_pad);
    size_t extra_len = (size_t)PyBytes_GET_SIZE(auth_extra);
    size_t cookie_field = 8 + NTS_COOKIE_NONCE + BLOCK + plain_len + pad_len;
    size_t cookies_len = count * cookie_field;
    size_t ct_len = BLOCK + cookies_len;
    size_t ct_pad = (4 - ct_len % 4) % 4;
    size_t auth_len = auth_fixed + ct_len + ct_pad;
    if (auth_len > 0xFFFF || ct_len > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "authenticator too long");
        return NULL;
    }
    size_t total = uid_end + 8 + nonce_len + nonce_pad_len + ct_len + ct_pad + extra_len;
    if (total > (size_t)PyBytes_GET_SIZE(request)) {
        /* the caller sizes ``count`` so that this never happens: a response
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
    unsigned char *o = (unsigned char *)PyBytes_AS_STRING(out);
    AesSivObject *master = (AesSivObject *)master_obj;
    int ok = 1;

    /* The cookie fields: header and key id, nonce, SIV and ciphertext, padding. */
    for (size_t i = 0; ok && i < count; i++) {
        unsigned char *c = cookies + i * cookie_field;
        const unsigned char *cnonce = rnd + i * NTS_COOKIE_NONCE;
        Piece ads[2] = {{head + 4, 4}, {cnonce, NTS_COOKIE_NONCE}};
        memcpy(c, head, 8);
        memcpy(c + 8, cnonce, NTS_COOKIE_NONCE);
        unsigned char *siv = c + 8 + NTS_COOKIE_NONCE;
        const unsigned char *plain = (const unsigned char *)PyBytes_AS_STRING(sealable);
        ok = s2v(master, ads, 2, plain, plain_len, siv)
             && ctr_xor(master, siv, plain, plain_len, siv + BLOCK);
        memset(siv + BLOCK + plain_len, 0, pad_len);
    }

    /* The packet so far: header and unique identifier, the associated data. */
    memcpy(o, PyBytes_AS_STRING(header), NTS_HEADER_LEN);
    memcpy(o + NTS_HEADER_LEN, req + NTS_HEADER_LEN, uid_end - NTS_HEADER_LEN);
    unsigned char *a = o + uid_end;
    put16(a, NTS_AUTHENTICATOR);
    put16(a + 2, auth_len);
    put16(a + 4, nonce_len);
    put16(a + 6, ct_len);
    const unsigned char *nonce = rnd + count * NTS_COOKIE_NONCE;
    memcpy(a + 8, nonce, nonce_len);
    memset(a + 8 + nonce_len, 0, nonce_pad_len);
    unsigned char *ct = a + 8 + nonce_len + nonce_pad_len;
    if (ok) {
        Piece ads[2] = {{o, uid_end}, {nonce, nonce_len}};
        ok = s2v((AesSivObject *)s2c, ads, 2, cookies, cookies_len, ct)
             && ctr_xor((AesSivObject *)s2c, ct, cookies, cookies_len, ct + BLOCK);
    }
    memset(ct + ct_len, 0, ct_pad + extra_len);
    if (cookies != NULL) {
        OPENSSL_cleanse(cookies, cookies_len);
        PyMem_Free(cookies);
    }
    if (!ok) {
        Py_DECREF(out);
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL AES operation failed");
        return NULL;
    }
    return out;
}

/* ------------------------------------------------------------------------
 * Batched datagram I/O for the UDP server loop (net/udp.py).
 *
 * recvmsg + sendto cost ~4.7 us per NTS exchange in Python, most of it the
 * two system calls and the objects socket.recvmsg builds. recvmmsg/sendmmsg
 * move up to BATCH_MAX datagrams per call. Both functions hold the GIL: the
 * calls are non-blocking (MSG_DONTWAIT), and nothing here runs Python code
 * between building the message vectors and the system call, so no other
 * thread or finalizer can change what the kernel is reading or writing.
 * ------------------------------------------------------------------------ */
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

PyDoc_STRVAR(recv_batch_doc,
"recv_batch(fd, max_count, bufsize, /) -> list[tuple[bytes | None, tuple | None, int]]\n\n"
"Read up to max_count (1-256) queued datagrams from fd with one recvmmsg call,\n"
"without blocking. Each is (data, address, rx_ns): address in the socket\n"
"module's format (None for families other than AF_INET/AF_INET6), rx_ns the\n"
"SCM_TIMESTAMPNS kernel receive time in Unix ns or -1 without one, and data\n"
"None when the datagram was longer than bufsize (1-65536) and got truncated.\n"
"An empty list when nothing is queued; OSError on other errors.");

static PyObject *
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

PyDoc_STRVAR(send_batch_doc,
"send_batch(fd, items, /) -> int\n\n"
"Send each (data: bytes, address) of items (a list or tuple of at most 256)\n"
"from fd with sendmmsg, without blocking. Addresses are numeric, in the\n"
"socket module's format. A datagram the kernel refuses is skipped and the\n"
"rest still go out; returns how many were sent. Malformed items raise\n"
"TypeError/ValueError/OverflowError before anything is sent.");

static PyObject *
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

static PyMethodDef accel_functions[] = {
    {"recv_batch", (PyCFunction)(void (*)(void))accel_recv_batch, METH_FASTCALL, recv_batch_doc},
    {"send_batch", (PyCFunction)(void (*)(void))accel_send_batch, METH_FASTCALL, send_batch_doc},
    {"nts_reply", (PyCFunction)(void (*)(void))accel_nts_reply, METH_FASTCALL, nts_reply_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef accel_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "ntspy._accel",
    .m_doc = "Optional compiled AES-SIV and batched UDP I/O for ntspy's server (see _accel.c).",
    .m_size = -1,
    .m_methods = accel_functions,
};

PyMODINIT_FUNC
PyInit__accel(void)
{
    static const char *cbc[3] = {"AES-128-CBC", "AES-192-CBC", "AES-256-CBC"};
    static const char *ctr[3] = {"AES-128-CTR", "AES-192-CTR", "AES-256-CTR"};
    PyObject *m;

    for (int i = 0; i < 3; i++) {
        if (cbc_ciphers[i] == NULL)
            cbc_ciphers[i] = EVP_CIPHER_fetch(NULL, cbc[i], NULL);
        if (ctr_ciphers[i] == NULL)
            ctr_ciphers[i] = EVP_CIPHER_fetch(NULL, ctr[i], NULL);
        if (cbc_ciphers[i] == NULL || ctr_ciphers[i] == NULL) {
            PyErr_SetString(PyExc_ImportError, "OpenSSL has no AES-CBC/AES-CTR");
            return NULL;
        }
    }
    if (PyType_Ready(&AesSivType) < 0)
        return NULL;
    m = PyModule_Create(&accel_module);
    if (m == NULL)
        return NULL;
    if (InvalidTag == NULL) {
        InvalidTag = PyErr_NewExceptionWithDoc(
            "ntspy._accel.InvalidTag", "The input did not verify under this key.", NULL, NULL);
        if (InvalidTag == NULL) {
            Py_DECREF(m);
            return NULL;
        }
    }
    Py_INCREF(InvalidTag);
    if (PyModule_AddObject(m, "InvalidTag", InvalidTag) < 0) {
        Py_DECREF(InvalidTag);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&AesSivType);
    if (PyModule_AddObject(m, "AesSiv", (PyObject *)&AesSivType) < 0) {
        Py_DECREF(&AesSivType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
