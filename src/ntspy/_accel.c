/*
 * ntspy._accel: the optional compiled primitives of the NTS server's packet
 * path, one file per idea (see _accel.h): AES-SIV keyed once, the compiled
 * backends of proto/nts.py's response builder and request scanner, and
 * batched UDP I/O.
 *
 * The module is optional: every user falls back to pure Python when it cannot
 * be imported (or NTSPY_NO_ACCEL=1, see _optional.py), and tests check that
 * both give the same bytes (tests/unit/test_backends.py).
 */
#include "_accel.h"

int
accel_add_type(PyObject *module, const char *name, PyTypeObject *type)
{
    if (PyType_Ready(type) < 0)
        return -1;
    Py_INCREF(type);
    if (PyModule_AddObject(module, name, (PyObject *)type) < 0) {
        Py_DECREF(type);
        return -1;
    }
    return 0;
}

static PyMethodDef accel_functions[] = {
    {"recv_batch", (PyCFunction)(void (*)(void))accel_recv_batch, METH_FASTCALL, recv_batch_doc},
    {"send_batch", (PyCFunction)(void (*)(void))accel_send_batch, METH_FASTCALL, send_batch_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef accel_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "ntspy._accel",
    .m_doc = "Optional compiled AES-SIV, NTS response backend and batched UDP I/O for "
             "ntspy's server (see _accel.c).",
    .m_size = -1,
    .m_methods = accel_functions,
};

PyMODINIT_FUNC
PyInit__accel(void)
{
    PyObject *m = PyModule_Create(&accel_module);
    if (m == NULL)
        return NULL;
    if (accel_siv_init(m) < 0 || accel_nts_init(m) < 0 || accel_scan_init(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
