/* Compiled fast paths of the two per-sample steps of reshard that are pure interpreter work: reading
 * one sample's tar members out of its catalog span, and packing output members behind new ustar
 * headers. Optional: laiontools runs without it (the same functions in Python, laiontools.wds.tarscan
 * and laiontools.wds.writer), and each function here handles only the plain, common form of its input
 * and answers None / False for anything else, so that the Python code, which stays the definition,
 * decides every unusual case (and names its error). tests/test_tarfast.py compares both on valid,
 * damaged and random inputs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define BLOCK 512

static int is_space(unsigned char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == 0x0b || c == 0x0c; }

/* A header's octal number field as tarscan._octal reads it (up to the first NUL, ASCII whitespace
 * stripped, empty = 0); 0 when it is anything but octal digits (the Python code decides then). */
static int octal_field(const unsigned char *f, Py_ssize_t len, long long *out) {
    Py_ssize_t a = 0, b = 0;
    while (b < len && f[b] != 0) b++;
    while (a < b && is_space(f[a])) a++;
    while (b > a && is_space(f[b - 1])) b--;
    long long v = 0;
    for (Py_ssize_t i = a; i < b; i++) {
        if (f[i] < '0' || f[i] > '7') return 0;
        v = v * 8 + (f[i] - '0');
    }
    *out = v;
    return 1;
}

/* Decimal digits only, 1..18 of them (a pax "size" record, a record's length). */
static int decimal(const unsigned char *s, Py_ssize_t len, long long *out) {
    if (len < 1 || len > 18) return 0;
    long long v = 0;
    for (Py_ssize_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9') return 0;
        v = v * 10 + (s[i] - '0');
    }
    *out = v;
    return 1;
}

/* int(float(v)) of a pax "mtime" record of the form digits[.digits], as Python computes it (the same
 * string-to-double conversion, then truncation); 0 for any other form. */
static int pax_mtime(const unsigned char *s, Py_ssize_t len, long long *out) {
    char tmp[40];
    Py_ssize_t i = 0, dot = -1;
    if (len < 1 || len >= (Py_ssize_t)sizeof(tmp)) return 0;
    for (; i < len; i++) {
        if (s[i] == '.' && dot < 0 && i > 0) dot = i;
        else if (s[i] < '0' || s[i] > '9') return 0;
    }
    if (dot == len - 1) return 0;
    memcpy(tmp, s, len);
    tmp[len] = 0;
    char *end = NULL;
    double d = PyOS_string_to_double(tmp, &end, NULL);
    if (d == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    if (end != tmp + len || !(d >= 0.0 && d < 9.0e15)) return 0;
    *out = (long long)d;
    return 1;
}

/* A member name the fast path takes: printable ASCII, no slash (so webdataset's key rule is "up to
 * the first dot" and cannot see a newline or a folder). */
static int plain_name(const unsigned char *s, Py_ssize_t len) {
    if (len < 1) return 0;
    for (Py_ssize_t i = 0; i < len; i++)
        if (s[i] < 0x20 || s[i] > 0x7e || s[i] == '/') return 0;
    return 1;
}

/* span_members(buf: bytes, skey: str) -> [(ext, data offset, size, mtime)] | None
 *
 * The members of one sample's span, as reshard._span_members takes them from tarscan.parse_span and
 * webdataset's key rule: every member a regular file named <skey>.<ext>, each header with the ustar
 * magic and optionally a per-file pax header (path, size, mtime), the members ending exactly at the
 * end of the span. None whenever the span is anything else (a directory, a prefix field, a name
 * outside plain ASCII, a number in another form, damage): the caller then runs the Python code. */
static PyObject *span_members(PyObject *self, PyObject *args) {
    Py_buffer view;
    PyObject *skey_obj;
    Py_ssize_t skey_len;
    if (!PyArg_ParseTuple(args, "y*U", &view, &skey_obj)) return NULL;
    /* a key that UTF-8 cannot encode (lone surrogates) cannot be a plain name: Python's */
    const char *skey = PyUnicode_AsUTF8AndSize(skey_obj, &skey_len);
    if (skey == NULL) {
        PyErr_Clear();
        PyBuffer_Release(&view);
        Py_RETURN_NONE;
    }
    const unsigned char *b = (const unsigned char *)view.buf;
    Py_ssize_t n = view.len, pos = 0;
    PyObject *out = PyList_New(0);
    if (out == NULL) goto fail;
    int have_pax = 0;
    const unsigned char *pax_path = NULL;
    Py_ssize_t pax_path_len = 0;
    long long pax_size = -1, pax_mtime_v = -1;
    if (n == 0) goto not_fast;
    while (pos < n) {
        if (pos + BLOCK > n || memcmp(b + pos + 257, "ustar", 5) != 0) goto not_fast;
        const unsigned char *h = b + pos;
        unsigned char flag = h[156];
        if (flag == 'x') {
            long long size;
            if (have_pax || !octal_field(h + 124, 12, &size) || pos + BLOCK + size > n) goto not_fast;
            const unsigned char *d = h + BLOCK;
            Py_ssize_t p = 0, m = (Py_ssize_t)size;
            pax_path = NULL;
            pax_size = pax_mtime_v = -1;
            while (p < m) {
                Py_ssize_t sp = p, lim = p + 20 < m ? p + 20 : m;
                while (sp < lim && d[sp] != ' ') sp++;
                long long length;
                if (sp >= lim || !decimal(d + p, sp - p, &length)) goto not_fast;
                Py_ssize_t end = p + (Py_ssize_t)length;
                if (length <= 0 || end > m || d[end - 1] != '\n' || end - 1 < sp + 1) goto not_fast;
                const unsigned char *k = d + sp + 1, *eq = memchr(k, '=', (end - 1) - (sp + 1));
                if (eq == NULL) goto not_fast;
                const unsigned char *v = eq + 1;
                Py_ssize_t klen = eq - k, vlen = (d + end - 1) - v;
                if (klen == 4 && memcmp(k, "path", 4) == 0) {
                    pax_path = v;
                    pax_path_len = vlen;
                } else if (klen == 4 && memcmp(k, "size", 4) == 0) {
                    if (!decimal(v, vlen, &pax_size)) goto not_fast;
                } else if (klen == 5 && memcmp(k, "mtime", 5) == 0) {
                    if (!pax_mtime(v, vlen, &pax_mtime_v)) goto not_fast;
                } else if (klen >= 11 && memcmp(k, "GNU.sparse.", 11) == 0) {
                    goto not_fast; /* a sparse member: tarfile reads its name and bytes otherwise */
                }
                p = end;
            }
            have_pax = 1;
            pos += BLOCK + ((size + BLOCK - 1) / BLOCK) * BLOCK;
            continue;
        }
        if (flag != '0' && flag != 0) goto not_fast; /* directories and the rest: Python's */
        Py_ssize_t nlen = 0;
        while (nlen < 100 && h[nlen] != 0) nlen++;
        if (memcmp(h + 257, "ustar\0" "00", 8) == 0 && h[345] != 0) goto not_fast; /* a prefix field */
        if (nlen > 0 && h[nlen - 1] == '/') goto not_fast;
        const unsigned char *name = h;
        long long size, mtime;
        if (have_pax && pax_path != NULL) {
            name = pax_path;
            nlen = pax_path_len;
        }
        if (have_pax && pax_size >= 0) size = pax_size;
        else if (!octal_field(h + 124, 12, &size)) goto not_fast;
        if (have_pax && pax_mtime_v >= 0) mtime = pax_mtime_v;
        else if (!octal_field(h + 136, 12, &mtime)) goto not_fast;
        have_pax = 0;
        pax_path = NULL;
        pax_size = pax_mtime_v = -1;
        Py_ssize_t start = pos + BLOCK;
        if (start + size > n || !plain_name(name, nlen)) goto not_fast;
        const unsigned char *dot = memchr(name, '.', nlen);
        if (dot == NULL || dot == name || dot == name + nlen - 1) goto not_fast;
        if (dot - name != skey_len || memcmp(name, skey, skey_len) != 0) goto not_fast;
        PyObject *item = Py_BuildValue("(s#nLL)", (const char *)dot + 1, (Py_ssize_t)(name + nlen - dot - 1), start, size, mtime);
        if (item == NULL) goto fail;
        int r = PyList_Append(out, item);
        Py_DECREF(item);
        if (r < 0) goto fail;
        pos = start + ((size + BLOCK - 1) / BLOCK) * BLOCK;
    }
    if (pos != n || have_pax || PyList_GET_SIZE(out) == 0) goto not_fast;
    PyBuffer_Release(&view);
    return out;
not_fast:
    Py_XDECREF(out);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
fail:
    Py_XDECREF(out);
    PyBuffer_Release(&view);
    return NULL;
}

#define OCT11 (1LL << 33) /* 8 ** 11: sizes and mtimes from here on do not fit 11 octal digits */

/* pack_members(small: bytearray, kb: bytes, members: list[(extb, data, mtime)], template: bytes) -> bool
 *
 * Append each member to `small` as writer.ShardWriter.add_sample does: its ustar header (the 512-byte
 * `template` of fixed fields, with name kb+extb, size, mtime and the checksum filled in, as
 * writer.ustar_header builds it), its data and zero padding to a whole block. False, with `small`
 * untouched, when some member needs the Python code (a name over 100 bytes, a size ustar cannot hold,
 * an entry of another form). */
static PyObject *pack_members(PyObject *self, PyObject *args) {
    PyObject *small, *members;
    Py_buffer kb, tmpl;
    if (!PyArg_ParseTuple(args, "Yy*Oy*", &small, &kb, &members, &tmpl)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t k = 0, total = 0;
    Py_buffer *data = NULL;
    Py_ssize_t got = 0;
    if (tmpl.len != BLOCK) {
        PyErr_SetString(PyExc_ValueError, "template is not one 512-byte block");
        goto done;
    }
    if (!PyList_Check(members)) goto not_fast; /* a tuple or any other iterable: the Python packing */
    k = PyList_GET_SIZE(members);
    data = PyMem_Calloc(k ? k : 1, sizeof(Py_buffer));
    if (data == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < k; i++) {
        PyObject *t = PyList_GET_ITEM(members, i);
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 3 || !PyBytes_Check(PyTuple_GET_ITEM(t, 0)) ||
            !PyLong_Check(PyTuple_GET_ITEM(t, 2)) || kb.len + PyBytes_GET_SIZE(PyTuple_GET_ITEM(t, 0)) > 100)
            goto not_fast;
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(t, 1), &data[i], PyBUF_SIMPLE) < 0) {
            PyErr_Clear();
            goto not_fast;
        }
        got++;
        if (data[i].len >= OCT11) goto not_fast;
        total += BLOCK + data[i].len + ((BLOCK - data[i].len % BLOCK) % BLOCK);
    }
    Py_ssize_t at = PyByteArray_GET_SIZE(small);
    if (PyByteArray_Resize(small, at + total) < 0) goto done;
    unsigned char *o = (unsigned char *)PyByteArray_AS_STRING(small) + at;
    for (Py_ssize_t i = 0; i < k; i++) {
        PyObject *t = PyList_GET_ITEM(members, i), *ext = PyTuple_GET_ITEM(t, 0);
        int overflow = 0;
        long long mtime = PyLong_AsLongLongAndOverflow(PyTuple_GET_ITEM(t, 2), &overflow);
        if (overflow > 0 || mtime >= OCT11) mtime = OCT11 - 1; /* clamped to what ustar holds */
        else if (overflow < 0 || mtime < 0) mtime = 0;
        long long size = data[i].len;
        unsigned char *hd = o;
        memcpy(hd, tmpl.buf, BLOCK);
        memset(hd, 0, 100);
        memcpy(hd, kb.buf, kb.len);
        memcpy(hd + kb.len, PyBytes_AS_STRING(ext), PyBytes_GET_SIZE(ext));
        char nums[25];
        snprintf(nums, sizeof(nums), "%011llo", (unsigned long long)size);
        snprintf(nums + 12, sizeof(nums) - 12, "%011llo", (unsigned long long)mtime);
        nums[11] = 0;
        memcpy(hd + 124, nums, 24);
        memset(hd + 148, ' ', 8);
        unsigned long chk = 0;
        for (int j = 0; j < BLOCK; j++) chk += hd[j];
        char cs[9];
        snprintf(cs, sizeof(cs), "%06lo", chk);
        memcpy(hd + 148, cs, 6);
        hd[154] = 0;
        hd[155] = ' ';
        o += BLOCK;
        memcpy(o, data[i].buf, size);
        o += size;
        Py_ssize_t pad = (BLOCK - size % BLOCK) % BLOCK;
        memset(o, 0, pad);
        o += pad;
    }
    result = Py_True;
    Py_INCREF(result);
    goto done;
not_fast:
    result = Py_False;
    Py_INCREF(result);
done:
    for (Py_ssize_t i = 0; i < got; i++) PyBuffer_Release(&data[i]);
    PyMem_Free(data);
    PyBuffer_Release(&kb);
    PyBuffer_Release(&tmpl);
    return result;
}

static PyMethodDef methods[] = {
    {"span_members", span_members, METH_VARARGS, "The members of one sample's tar span, or None (see the C source)."},
    {"pack_members", pack_members, METH_VARARGS, "Append members with ustar headers to a bytearray; False: not handled."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "tarfast", "Compiled fast paths of reshard's per-sample work.", -1, methods};

PyMODINIT_FUNC PyInit_tarfast(void) { return PyModule_Create(&module); }
