/*
 * What the parts of ntspy._accel share (one extension, one file per idea):
 *
 *   _accel.c       the module: init, the function table
 *   _accel_siv.c   AES-SIV-CMAC keyed once (the AesSiv type, s2v, ctr_xor)
 *   _accel_nts.c   the compiled backend of proto/nts.py's response builder
 *                  (the NtsPlan type)
 *   _accel_scan.c  the compiled backend of proto/nts.py's request scanner
 *                  (the RequestScanner type)
 *   _accel_udp.c   recvmmsg/sendmmsg batches for net/udp.py
 *
 * Every call holds the GIL: one NTS packet costs well under a microsecond
 * here, less than releasing and re-taking the GIL would, and holding it also
 * serialises the use of each object's cipher contexts.
 */
#ifndef NTSPY_ACCEL_H
#define NTSPY_ACCEL_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stddef.h>
#include <string.h>

#include <openssl/evp.h>

#define BLOCK 16

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

/* Zero a buffer that held key material or plaintext, in a way the compiler
 * may not drop (glibc's explicit_bzero: a plain memset, several times faster
 * than OPENSSL_cleanse's byte loop on the packet path's small buffers). */
static inline void
wipe(void *p, size_t n)
{
    explicit_bzero(p, n);
}

/* One associated-data component (or any byte range). */
typedef struct {
    const unsigned char *buf;
    size_t len;
} Piece;

/* _accel.c: ready ``type`` and add it to the module as ``name``; 0, or -1 with an
 * exception set. */
int accel_add_type(PyObject *module, const char *name, PyTypeObject *type);

/* _accel_siv.c */
extern PyTypeObject AesSivType;
extern PyObject *InvalidTag;
/* S2V (RFC 5297 s2.4) over the associated-data pieces, then the plaintext. */
int s2v(AesSivObject *s, const Piece *ads, Py_ssize_t n_ads, const unsigned char *p,
        size_t plen, unsigned char v[BLOCK]);
/* out <- in XOR AES-CTR(K2, V with the two bits RFC 5297 s2.5 clears). */
int ctr_xor(AesSivObject *s, const unsigned char v[BLOCK], const unsigned char *in, size_t len,
            unsigned char *out);
int accel_siv_init(PyObject *module);

/* _accel_nts.c */
int accel_nts_init(PyObject *module);

/* _accel_scan.c */
int accel_scan_init(PyObject *module);

/* _accel_udp.c */
PyObject *accel_recv_batch(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
PyObject *accel_send_batch(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
extern const char recv_batch_doc[];
extern const char send_batch_doc[];

#endif
