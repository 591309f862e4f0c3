// adamx._native._ext: the compiled side of adamx/_native/__init__.py.
//
// Exposes the FFI handler as a capsule for jax.ffi.register_ffi_target, the ABI of abi.h as
// Python values (SCALARS, FLAGS, TARGET), what the build was made against (FFI_API_VERSION,
// JAXLIB_VERSION), the instruction-set variants (ISAS, SUPPORTED_ISAS, DISPATCHED_ISA), and
// run_isa, which runs one variant over NumPy arrays so that tests can compare variants bit for
// bit. Importing it registers nothing.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "abi.h"
#include "kernel.h"
#include "xla/ffi/api/c_api.h"

#ifndef ADAMX_JAXLIB_VERSION
#define ADAMX_JAXLIB_VERSION "unknown"
#endif

extern "C" XLA_FFI_Error* AdamxAdamStepF32(XLA_FFI_CallFrame* call_frame);

namespace {

PyObject* Registrations(PyObject*, PyObject*) {
  PyObject* capsule = PyCapsule_New(reinterpret_cast<void*>(&AdamxAdamStepF32), nullptr, nullptr);
  if (capsule == nullptr) return nullptr;
  return Py_BuildValue("{sN}", ADAMX_STEP_TARGET, capsule);
}

// A contiguous float32 buffer of an object (writable if asked), released on destruction.
struct FloatBuffer {
  Py_buffer view{};
  bool held = false;

  bool Get(PyObject* obj, bool writable, const char* what) {
    const int access = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, &view, access) != 0) return false;
    held = true;
    const char* f = view.format;
    if (f != nullptr && (*f == '<' || *f == '=' || *f == '@')) ++f;
    if (view.itemsize != 4 || f == nullptr || std::strcmp(f, "f") != 0) {
      PyErr_Format(PyExc_TypeError, "adamx._native._ext.run_isa: %s must be a float32 array",
                   what);
      return false;
    }
    return true;
  }
  int64_t size() const { return static_cast<int64_t>(view.len / 4); }
  float* data() const { return static_cast<float*>(view.buf); }
  ~FloatBuffer() {
    if (held) PyBuffer_Release(&view);
  }
};

PyObject* RunIsa(PyObject*, PyObject* args) {
  const char* name;
  PyObject *scalars_obj, *p_obj, *g_obj, *m_obj, *v_obj;
  long long flags;
  int decay;
  if (!PyArg_ParseTuple(args, "sOOOOOLp", &name, &scalars_obj, &p_obj, &g_obj, &m_obj, &v_obj,
                        &flags, &decay)) {
    return nullptr;
  }
  int isa = 0;
  while (isa < adamx::NumIsas() && std::strcmp(adamx::IsaName(isa), name) != 0) ++isa;
  if (isa == adamx::NumIsas()) {
    PyErr_Format(PyExc_ValueError, "adamx._native._ext.run_isa: unknown variant '%s'", name);
    return nullptr;
  }
  if (!adamx::IsaSupported(isa)) {
    PyErr_Format(PyExc_RuntimeError, "adamx._native._ext.run_isa: this CPU cannot run '%s'",
                 name);
    return nullptr;
  }
  if ((flags & ~adamx::flag::kAll) != 0) {
    PyErr_Format(PyExc_ValueError, "adamx._native._ext.run_isa: unknown flag bits in %lld",
                 flags);
    return nullptr;
  }
  FloatBuffer scalars, p, g, m, v;
  if (!scalars.Get(scalars_obj, false, "scalars") || !p.Get(p_obj, true, "p") ||
      !g.Get(g_obj, false, "g") || !m.Get(m_obj, true, "m") || !v.Get(v_obj, true, "v")) {
    return nullptr;
  }
  if (scalars.size() != adamx::scalar::kCount) {
    PyErr_Format(PyExc_ValueError, "adamx._native._ext.run_isa: scalars must have %d elements",
                 static_cast<int>(adamx::scalar::kCount));
    return nullptr;
  }
  const int64_t n = p.size();
  if (g.size() != n || m.size() != n || v.size() != n) {
    PyErr_SetString(PyExc_ValueError, "adamx._native._ext.run_isa: p, g, m, v differ in size");
    return nullptr;
  }
  const adamx::Leaf leaf{p.data(), g.data(), m.data(), v.data(), p.data(), m.data(), v.data()};
  const adamx::StepFn fn = adamx::PickStep(isa, flags, decay != 0);
  Py_BEGIN_ALLOW_THREADS
  fn(leaf, 0, n, scalars.data());
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

PyMethodDef kMethods[] = {
    {"registrations", Registrations, METH_NOARGS,
     "{target name: handler capsule} for jax.ffi.register_ffi_target(..., platform='cpu')."},
    {"run_isa", RunIsa, METH_VARARGS,
     "run_isa(isa, scalars, p, g, m, v, flags, decay): one step of one leaf with the named "
     "variant, in place on the float32 arrays p, m, v, on this thread."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_ext", nullptr, -1, kMethods,
                       nullptr, nullptr, nullptr, nullptr};

// Sets module.attr to the tuple of the first `count` strings of `names`.
bool AddNames(PyObject* module, const char* attr, const char* const* names, int count) {
  PyObject* tuple = PyTuple_New(count);
  if (tuple == nullptr) return false;
  for (int i = 0; i < count; ++i) {
    PyObject* s = PyUnicode_FromString(names[i]);
    if (s == nullptr) {
      Py_DECREF(tuple);
      return false;
    }
    PyTuple_SET_ITEM(tuple, i, s);
  }
  if (PyModule_AddObject(module, attr, tuple) != 0) {
    Py_DECREF(tuple);
    return false;
  }
  return true;
}

bool AddAbi(PyObject* module) {
#define ADAMX_SCALAR_NAME(name) #name,
  static const char* const kScalarNames[] = {ADAMX_STEP_SCALARS(ADAMX_SCALAR_NAME)};
#undef ADAMX_SCALAR_NAME
  if (!AddNames(module, "SCALARS", kScalarNames, adamx::scalar::kCount)) return false;
  PyObject* flags = PyDict_New();
  if (flags == nullptr) return false;
#define ADAMX_FLAG_ITEM(name, bit)                                      \
  if (PyObject* value = PyLong_FromLongLong(adamx::flag::name)) {       \
    const int failed = PyDict_SetItemString(flags, #name, value);       \
    Py_DECREF(value);                                                   \
    if (failed) {                                                       \
      Py_DECREF(flags);                                                 \
      return false;                                                     \
    }                                                                   \
  } else {                                                              \
    Py_DECREF(flags);                                                   \
    return false;                                                       \
  }
  ADAMX_STEP_FLAGS(ADAMX_FLAG_ITEM)
#undef ADAMX_FLAG_ITEM
  if (PyModule_AddObject(module, "FLAGS", flags) != 0) {
    Py_DECREF(flags);
    return false;
  }
  return PyModule_AddStringConstant(module, "TARGET", ADAMX_STEP_TARGET) == 0;
}

bool AddBuild(PyObject* module) {
  PyObject* version = Py_BuildValue("(ii)", XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
  if (version == nullptr || PyModule_AddObject(module, "FFI_API_VERSION", version) != 0) {
    Py_XDECREF(version);
    return false;
  }
  if (PyModule_AddStringConstant(module, "JAXLIB_VERSION", ADAMX_JAXLIB_VERSION) != 0) {
    return false;
  }
  std::vector<const char*> all, supported;
  for (int isa = 0; isa < adamx::NumIsas(); ++isa) {
    all.push_back(adamx::IsaName(isa));
    if (adamx::IsaSupported(isa)) supported.push_back(adamx::IsaName(isa));
  }
  return AddNames(module, "ISAS", all.data(), static_cast<int>(all.size())) &&
         AddNames(module, "SUPPORTED_ISAS", supported.data(), static_cast<int>(supported.size())) &&
         PyModule_AddStringConstant(module, "DISPATCHED_ISA",
                                    adamx::IsaName(adamx::BestIsa())) == 0;
}

}  // namespace

PyMODINIT_FUNC PyInit__ext(void) {
  PyObject* module = PyModule_Create(&kModule);
  if (module == nullptr) return nullptr;
  if (!AddAbi(module) || !AddBuild(module)) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
