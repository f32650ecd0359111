/*
 * The compiled backend of proto/nts.py's scan_request: the RequestScanner type.
 *
 * What the usual request layout is (the four EF types, the shortest unique
 * identifier and authenticator fields, the tag length, the shortest packet)
 * is proto/nts.py's: it makes one scanner with those numbers at import, and
 * this file only walks a datagram's EF headers against them. The result is
 * the same tuple of nine offsets as the Python scanner's, or None for any
 * other layout (tests/unit/test_backends.py compares the two under
 * hypothesis).
 */
#include "_accel.h"

#define SCAN_HEADER_LEN 48

typedef struct {
    PyObject_HEAD
    unsigned int uid_type, cookie_type, placeholder_type, auth_type;
    size_t min_uid_ef, min_auth_ef, tag_len, min_packet;
} RequestScannerObject;

static unsigned int
be16(const unsigned char *p)
{
    return (unsigned int)p[0] << 8 | p[1];
}

static size_t
pad4(size_t n)
{
    return (n + 3) & ~(size_t)3;
}

static PyObject *
RequestScanner_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    unsigned int types[4];
    Py_ssize_t sizes[4];
    static char *names[] = {"uid_type", "cookie_type", "placeholder_type", "auth_type",
                            "min_uid_ef", "min_auth_ef", "tag_len", "min_packet", NULL};

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "IIIInnnn", names, &types[0], &types[1],
                                     &types[2], &types[3], &sizes[0], &sizes[1], &sizes[2],
                                     &sizes[3]))
        return NULL;
    for (int i = 0; i < 4; i++) {
        if (types[i] > 0xFFFF || sizes[i] < 0 || sizes[i] > 65535) {
            PyErr_SetString(PyExc_ValueError, "RequestScanner: a type or length out of range");
            return NULL;
        }
    }
    RequestScannerObject *self = (RequestScannerObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->uid_type = types[0];
    self->cookie_type = types[1];
    self->placeholder_type = types[2];
    self->auth_type = types[3];
    self->min_uid_ef = (size_t)sizes[0];
    self->min_auth_ef = (size_t)sizes[1];
    self->tag_len = (size_t)sizes[2];
    self->min_packet = (size_t)sizes[3];
    return (PyObject *)self;
}

PyDoc_STRVAR(RequestScanner_scan_doc,
"scan(data, /) -> tuple[int, ...] | None\n\n"
"proto/nts.py's scan_request(data) (see there): the nine offsets of a request\n"
"in the usual layout, or None.");

static PyObject *
RequestScanner_scan(RequestScannerObject *self, PyObject *data)
{
    if (!PyBytes_Check(data)) {
        PyErr_SetString(PyExc_TypeError, "scan() takes bytes");
        return NULL;
    }
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(data);
    size_t n = (size_t)PyBytes_GET_SIZE(data);
    if (n < self->min_packet || n < SCAN_HEADER_LEN + 4)
        Py_RETURN_NONE;
    size_t pos = SCAN_HEADER_LEN;
    size_t length = be16(p + pos + 2);
    if (be16(p + pos) != self->uid_type || length < self->min_uid_ef || (length & 3))
        Py_RETURN_NONE;
    size_t uid_end = pos + length;
    pos = uid_end;
    if (pos + 4 > n)
        Py_RETURN_NONE;
    length = be16(p + pos + 2);
    if (be16(p + pos) != self->cookie_type || length < 16 || (length & 3))
        Py_RETURN_NONE;
    size_t cookie_len = length;
    pos += length;
    size_t cookie_end = pos;
    size_t placeholders = 0;
    unsigned int ef_type;
    for (;;) {
        if (pos + 4 > n)
            Py_RETURN_NONE;
        ef_type = be16(p + pos);
        length = be16(p + pos + 2);
        if (ef_type != self->placeholder_type || length != cookie_len)
            break;
        placeholders++;
        pos += length;
    }
    if (ef_type != self->auth_type || pos + length != n || length < self->min_auth_ef
        || (length & 3))
        Py_RETURN_NONE;
    /* length >= min_auth_ef (which proto keeps above 8): the two lengths are inside */
    if (pos + 8 > n)
        Py_RETURN_NONE;
    size_t nonce_len = be16(p + pos + 4), ct_len = be16(p + pos + 6);
    size_t nonce_start = pos + 8;
    size_t ct_start = nonce_start + pad4(nonce_len);
    if (nonce_len == 0 || ct_len != self->tag_len || ct_start + pad4(ct_len) > n)
        Py_RETURN_NONE;
    return Py_BuildValue("(nnnnnnnnn)", (Py_ssize_t)(uid_end + 4), (Py_ssize_t)cookie_end,
                         (Py_ssize_t)placeholders, (Py_ssize_t)uid_end, (Py_ssize_t)pos,
                         (Py_ssize_t)nonce_start, (Py_ssize_t)(nonce_start + nonce_len),
                         (Py_ssize_t)ct_start, (Py_ssize_t)(ct_start + ct_len));
}

static PyMethodDef RequestScanner_methods[] = {
    {"scan", (PyCFunction)RequestScanner_scan, METH_O, RequestScanner_scan_doc},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(RequestScanner_doc,
"RequestScanner(uid_type, cookie_type, placeholder_type, auth_type, min_uid_ef,\n"
"               min_auth_ef, tag_len, min_packet)\n\n"
"The usual NTS request layout as proto/nts.py defines it, for scan().");

static PyTypeObject RequestScannerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ntspy._accel.RequestScanner",
    .tp_basicsize = sizeof(RequestScannerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = RequestScanner_doc,
    .tp_methods = RequestScanner_methods,
    .tp_new = RequestScanner_new,
};

int
accel_scan_init(PyObject *module)
{
    return accel_add_type(module, "RequestScanner", &RequestScannerType);
}
