// adamx._native._ext: the compiled side of adamx/_native/__init__.py.
//
// Exposes the FFI handler as a capsule for jax.ffi.register_ffi_target; the ABI of abi.h as
// Python values (ABI_VERSION, TARGET, SCALARS, FLAGS, LEAF_FIELDS, PARAM_DTYPES, ROUNDINGS,
// MOMENT_FORMATS), so that Python never parses the header; the XLA FFI API version the handler
// was built against (FFI_API_VERSION); and the instruction-set variants (ISAS, SUPPORTED_ISAS,
// DISPATCHED_ISA), which the custom call's isa attribute picks by position. Importing it
// registers nothing.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <vector>

#include "abi.h"
#include "kernel.h"
#include "xla/ffi/api/c_api.h"

extern "C" XLA_FFI_Error* AdamxAdamStep(XLA_FFI_CallFrame* call_frame);

namespace {

PyObject* Registrations(PyObject*, PyObject*) {
  PyObject* capsule = PyCapsule_New(reinterpret_cast<void*>(&AdamxAdamStep), nullptr, nullptr);
  if (capsule == nullptr) return nullptr;
  return Py_BuildValue("{sN}", ADAMX_STEP_TARGET, capsule);
}

PyMethodDef kMethods[] = {
    {"registrations", Registrations, METH_NOARGS,
     "{target name: handler capsule} for jax.ffi.register_ffi_target(..., platform='cpu')."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_ext", nullptr, -1, kMethods,
                       nullptr, nullptr, nullptr, nullptr};

// Adds module.attr = value, taking the reference; false (with the Python error set) on failure.
bool Add(PyObject* module, const char* attr, PyObject* value) {
  if (value == nullptr) return false;
  if (PyModule_AddObject(module, attr, value) != 0) {
    Py_DECREF(value);
    return false;
  }
  return true;
}

// A tuple of the strings names[0, count).
PyObject* Names(const char* const* names, int count) {
  PyObject* tuple = PyTuple_New(count);
  if (tuple == nullptr) return nullptr;
  for (int i = 0; i < count; ++i) {
    PyObject* s = PyUnicode_FromString(names[i]);
    if (s == nullptr) {
      Py_DECREF(tuple);
      return nullptr;
    }
    PyTuple_SET_ITEM(tuple, i, s);
  }
  return tuple;
}

// One entry of an ABI list: its name, value and, for a moment format, its number of arrays.
struct Entry {
  const char* name;
  long long value;
  long long extra;
};

// A dict {name: value}, or {name: (value, arrays)} where `pairs`.
PyObject* Dict(const std::vector<Entry>& entries, bool pairs) {
  PyObject* dict = PyDict_New();
  if (dict == nullptr) return nullptr;
  for (const Entry& e : entries) {
    PyObject* value =
        pairs ? Py_BuildValue("(LL)", e.value, e.extra) : PyLong_FromLongLong(e.value);
    const int failed = value == nullptr || PyDict_SetItemString(dict, e.name, value) != 0;
    Py_XDECREF(value);
    if (failed) {
      Py_DECREF(dict);
      return nullptr;
    }
  }
  return dict;
}

bool AddAbi(PyObject* module) {
#define ADAMX_NAME(name) #name,
  static const char* const kScalars[] = {ADAMX_STEP_SCALARS(ADAMX_NAME)};
  static const char* const kFields[] = {ADAMX_LEAF_FIELDS(ADAMX_NAME)};
#undef ADAMX_NAME
#define ADAMX_ENTRY(name, value) {#name, value, 0},
#define ADAMX_BIT(name, bit) {#name, 1LL << (bit), 0},
#define ADAMX_FORMAT(name, value, arrays) {#name, value, arrays},
  const std::vector<Entry> flags = {ADAMX_STEP_FLAGS(ADAMX_BIT)};
  const std::vector<Entry> params = {ADAMX_PARAM_DTYPES(ADAMX_ENTRY)};
  const std::vector<Entry> roundings = {ADAMX_ROUNDINGS(ADAMX_ENTRY)};
  const std::vector<Entry> formats = {ADAMX_MOMENT_FORMATS(ADAMX_FORMAT)};
#undef ADAMX_ENTRY
#undef ADAMX_BIT
#undef ADAMX_FORMAT
  return PyModule_AddIntConstant(module, "ABI_VERSION", ADAMX_ABI_VERSION) == 0 &&
         PyModule_AddStringConstant(module, "TARGET", ADAMX_STEP_TARGET) == 0 &&
         Add(module, "SCALARS", Names(kScalars, adamx::scalar::kCount)) &&
         Add(module, "LEAF_FIELDS", Names(kFields, adamx::field::kCount)) &&
         Add(module, "FLAGS", Dict(flags, false)) &&
         Add(module, "PARAM_DTYPES", Dict(params, false)) &&
         Add(module, "ROUNDINGS", Dict(roundings, false)) &&
         Add(module, "MOMENT_FORMATS", Dict(formats, true));
}

bool AddBuild(PyObject* module) {
  std::vector<const char*> all, supported;
  for (int isa = 0; isa < adamx::NumIsas(); ++isa) {
    all.push_back(adamx::IsaName(isa));
    if (adamx::IsaSupported(isa)) supported.push_back(adamx::IsaName(isa));
  }
  PyObject* api = Py_BuildValue("(ii)", XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
  return Add(module, "FFI_API_VERSION", api) &&
         Add(module, "ISAS", Names(all.data(), static_cast<int>(all.size()))) &&
         Add(module, "SUPPORTED_ISAS",
             Names(supported.data(), static_cast<int>(supported.size()))) &&
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
