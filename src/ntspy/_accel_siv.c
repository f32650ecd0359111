/*
 * AES-SIV-CMAC (RFC 5297) that keeps its key schedules between calls: the
 * AesSiv type of ntspy._accel, and s2v/ctr_xor for the other parts.
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
 * ntspy.proto.aead falls back to `cryptography` when the module cannot be
 * imported, and tests check both give the same bytes.
 */
#include "_accel.h"

#include <endian.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>

#include <openssl/crypto.h>

/* RFC 5297 s2.6 / s7: at most 126 associated-data components. */
#define MAX_COMPONENTS 126
/* Inputs up to 1 GiB: far beyond any NTS packet, and every length stays an int
 * for the EVP calls. */
#define SIV_MAX_INPUT (1 << 30)
/* CBC-MAC output we throw away is written here, this many bytes at a time. */
#define SCRATCH 512

PyObject *InvalidTag;

/* Fetched once at import: EVP_CIPHER_fetch is not free, and new sessions
 * (a new client key) appear at run time. Index: key length / 16 - 2. */
static EVP_CIPHER *cbc_ciphers[3];
static EVP_CIPHER *ctr_ciphers[3];

/* Doubling in GF(2^128), RFC 5297 s2.3, without a branch on secret bits. */
static uint64_t
load_be64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return be64toh(v);
}

static void
store_be64(unsigned char *p, uint64_t v)
{
    v = htobe64(v);
    memcpy(p, &v, 8);
}

static void
dbl(unsigned char b[BLOCK])
{
    uint64_t hi = load_be64(b), lo = load_be64(b + 8);
    uint64_t carry = hi >> 63;
    store_be64(b, hi << 1 | lo >> 63);
    store_be64(b + 8, lo << 1 ^ ((0 - carry) & 0x87));
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
    size_t n = 0, used = 0; /* used: how much of scratch was written, to cleanse */
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
            used = BLOCK;
            wipe(blk, BLOCK);
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
        if (n > used)
            used = n;
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
    if (used > 0)
        wipe(scratch, used);
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
    wipe(blk, BLOCK);
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
    wipe(x, BLOCK);
    return ok;
}

/* S2V (RFC 5297 s2.4) over the associated-data pieces, then the plaintext. */
int
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
    wipe(d, BLOCK);
    wipe(mac, BLOCK);
    wipe(x, BLOCK);
    wipe(tail, sizeof tail);
    return ok;
}

/* out <- in XOR AES-CTR(K2, V with the two bits RFC 5297 s2.5 clears). */
int
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
    wipe(q, BLOCK);
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
        wipe(plain, plen);
        Py_DECREF(result);
        wipe(v, BLOCK);
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL AES operation failed");
        return NULL;
    }
    /* Constant time: how much of a forged tag was right must not show. */
    ok = CRYPTO_memcmp(v, ct->buf, BLOCK) == 0;
    wipe(v, BLOCK);
    if (!ok) {
        wipe(plain, plen);
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
    wipe(self->sub1, BLOCK);
    wipe(self->sub2, BLOCK);
    wipe(self->d0, BLOCK);
    wipe(self->chain, BLOCK);
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
        wipe(l, BLOCK);
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

/* The three buffer arguments of seal() and open(): nonce, text, associated
 * data. 0 with all three held (release them with release_three), -1 with an
 * exception set and none held. */
static int
three_buffers(const char *name, PyObject *const *args, Py_ssize_t nargs, Py_buffer b[3])
{
    Py_ssize_t i;

    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "%s() takes 3 arguments (%zd given)", name, nargs);
        return -1;
    }
    for (i = 0; i < 3; i++) {
        if (PyObject_GetBuffer(args[i], &b[i], PyBUF_SIMPLE) < 0) {
            while (i-- > 0)
                PyBuffer_Release(&b[i]);
            return -1;
        }
    }
    return 0;
}

static void
release_three(Py_buffer b[3])
{
    PyBuffer_Release(&b[0]);
    PyBuffer_Release(&b[1]);
    PyBuffer_Release(&b[2]);
}

/* NTS's two AES-SIV components: the associated data, then the nonce. */
static void
nts_components(Piece ads[2], const Py_buffer *nonce, const Py_buffer *ad)
{
    ads[0].buf = ad->buf;
    ads[0].len = (size_t)ad->len;
    ads[1].buf = nonce->buf;
    ads[1].len = (size_t)nonce->len;
}

static PyObject *
AesSiv_seal(AesSivObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer b[3]; /* nonce, plaintext, associated data */
    Piece ads[2];
    PyObject *result;

    if (three_buffers("seal", args, nargs, b) < 0)
        return NULL;
    nts_components(ads, &b[0], &b[2]);
    result = seal_pieces(self, ads, 2, &b[1]);
    release_three(b);
    return result;
}

PyDoc_STRVAR(open_doc,
"open(nonce, ciphertext, associated_data) -> bytes\n\n"
"The inverse of seal(); raises InvalidTag when the input does not verify\n"
"(also when it is shorter than the 16-byte SIV).");

static PyObject *
AesSiv_open(AesSivObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer b[3]; /* nonce, ciphertext, associated data */
    Piece ads[2];
    PyObject *result;

    if (three_buffers("open", args, nargs, b) < 0)
        return NULL;
    nts_components(ads, &b[0], &b[2]);
    result = open_pieces(self, ads, 2, &b[1]);
    release_three(b);
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

PyDoc_STRVAR(try_open_doc,
"try_open(nonce, ciphertext, associated_data) -> bytes | None\n\n"
"open(), with None instead of InvalidTag.");

static PyObject *
AesSiv_try_open(AesSivObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *result = AesSiv_open(self, args, nargs);
    if (result == NULL && PyErr_ExceptionMatches(InvalidTag)) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    return result;
}

static PyMethodDef AesSiv_methods[] = {
    {"seal", (PyCFunction)(void (*)(void))AesSiv_seal, METH_FASTCALL, seal_doc},
    {"open", (PyCFunction)(void (*)(void))AesSiv_open, METH_FASTCALL, open_doc},
    {"try_open", (PyCFunction)(void (*)(void))AesSiv_try_open, METH_FASTCALL, try_open_doc},
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

PyTypeObject AesSivType = {
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

/* Fetches the ciphers and readies the type; 0 on success, -1 with an exception. */
int
accel_siv_init(PyObject *module)
{
    static const char *cbc[3] = {"AES-128-CBC", "AES-192-CBC", "AES-256-CBC"};
    static const char *ctr[3] = {"AES-128-CTR", "AES-192-CTR", "AES-256-CTR"};

    for (int i = 0; i < 3; i++) {
        if (cbc_ciphers[i] == NULL)
            cbc_ciphers[i] = EVP_CIPHER_fetch(NULL, cbc[i], NULL);
        if (ctr_ciphers[i] == NULL)
            ctr_ciphers[i] = EVP_CIPHER_fetch(NULL, ctr[i], NULL);
        if (cbc_ciphers[i] == NULL || ctr_ciphers[i] == NULL) {
            PyErr_SetString(PyExc_ImportError, "OpenSSL has no AES-CBC/AES-CTR");
            return -1;
        }
    }
    if (InvalidTag == NULL) {
        InvalidTag = PyErr_NewExceptionWithDoc(
            "ntspy._accel.InvalidTag", "The input did not verify under this key.", NULL, NULL);
        if (InvalidTag == NULL)
            return -1;
    }
    Py_INCREF(InvalidTag);
    if (PyModule_AddObject(module, "InvalidTag", InvalidTag) < 0) {
        Py_DECREF(InvalidTag);
        return -1;
    }
    return accel_add_type(module, "AesSiv", &AesSivType);
}
