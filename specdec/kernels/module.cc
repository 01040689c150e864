// The Python module `specdec._cpu_kernels`: the XLA FFI handlers as capsules (for
// jax.ffi.register_ffi_target) and the ISA this CPU runs.
#include <Python.h>

#include "parallel.h"
#include "xla/ffi/api/c_api.h"

extern "C" XLA_FFI_Error* PackedMatmul(XLA_FFI_CallFrame*);
extern "C" XLA_FFI_Error* CacheAttention(XLA_FFI_CallFrame*);
extern "C" XLA_FFI_Error* CacheAttentionLse(XLA_FFI_CallFrame*);

static PyObject* capsule(void* fn) { return PyCapsule_New(fn, nullptr, nullptr); }
static PyObject* py_packed_matmul(PyObject*, PyObject*) { return capsule(reinterpret_cast<void*>(&PackedMatmul)); }
static PyObject* py_cache_attention(PyObject*, PyObject*) {
  return capsule(reinterpret_cast<void*>(&CacheAttention));
}
static PyObject* py_cache_attention_lse(PyObject*, PyObject*) {
  return capsule(reinterpret_cast<void*>(&CacheAttentionLse));
}
static PyObject* py_best_isa(PyObject*, PyObject*) { return PyLong_FromLong(static_cast<long>(specdec::best_isa())); }

static PyMethodDef kMethods[] = {
    {"packed_matmul", py_packed_matmul, METH_NOARGS, "FFI handler: y = x @ w over column-tiled w."},
    {"cache_attention", py_cache_attention, METH_NOARGS, "FFI handler: block attention over a KV cache."},
    {"cache_attention_lse", py_cache_attention_lse, METH_NOARGS,
     "FFI handler: block attention over a KV cache, and each row's log-sum-exp."},
    {"best_isa", py_best_isa, METH_NOARGS, "0 scalar, 1 AVX2+FMA, 2 AVX-512 (the widest this CPU runs)."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_cpu_kernels", "specdec's CPU kernels (XLA FFI)", -1,
                              kMethods};

PyMODINIT_FUNC PyInit__cpu_kernels() { return PyModule_Create(&kModule); }
