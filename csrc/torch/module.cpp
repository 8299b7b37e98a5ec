// The extension module bitpress._C: a few plain Python functions (build and CPU facts, the CPU ISA
// override) for bitpress.info / tests.
//
// Importing bitpress._C runs the static registrations of the op files: each feature's torch glue
// (csrc/<feature>/*_torch.cpp) declares its ops' schemas with TORCH_LIBRARY_FRAGMENT(bitpress, m)
// next to their implementations, so no file owns the `bitpress` library.
#include <Python.h>

#include <string>

#include "bitpress/common/cpu.h"
#include "bitpress/common/version.h"
#include "glue.h"
#include "int4/int4_gemm_dense.h"

#ifndef BITPRESS_CUDA_ARCHS
#define BITPRESS_CUDA_ARCHS ""
#endif

namespace {

PyObject* py_cpu_features(PyObject*, PyObject*) {
  const bitpress::CpuFeatures& f = bitpress::cpu_features();
  std::string s;
  auto add = [&](bool on, const char* name) {
    if (on) s += std::string(s.empty() ? "" : ",") + name;
  };
  add(f.avx2, "avx2");
  add(f.fma, "fma");
  add(f.f16c, "f16c");
  add(f.avx512f, "avx512f");
  add(f.avx512bw, "avx512bw");
  add(f.avx512vl, "avx512vl");
  add(f.avx512dq, "avx512dq");
  add(f.avx512_vnni, "avx512_vnni");
  add(f.avx512_bf16, "avx512_bf16");
  add(f.avx512_fp16, "avx512_fp16");
  add(f.amx_tile, "amx_tile");
  add(f.amx_bf16, "amx_bf16");
  add(f.amx_int8, "amx_int8");
  return PyUnicode_FromString(s.c_str());
}

PyObject* py_cuda_archs(PyObject*, PyObject*) { return PyUnicode_FromString(BITPRESS_CUDA_ARCHS); }

PyObject* py_with_cuda(PyObject*, PyObject*) {
#if defined(BITPRESS_WITH_CUDA)
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyObject* py_cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(bitpress::cpu_isa_name(bitpress::active_cpu_isa()));
}

PyObject* py_best_cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(bitpress::cpu_isa_name(bitpress::best_cpu_isa()));
}

// set_cpu_isa(name or None): force a CPU kernel path ("scalar", "avx2", "avx512", "amx"); None
// resets.
PyObject* py_set_cpu_isa(PyObject*, PyObject* arg) {
  if (arg == Py_None) {
    bitpress::reset_cpu_isa();
    Py_RETURN_NONE;
  }
  const char* name = PyUnicode_AsUTF8(arg);
  if (!name) return nullptr;
  bitpress::CpuIsa isa;
  if (bitpress::cpu_isa_from_name(name, &isa)) {
    if (bitpress::set_cpu_isa(isa) != bitpress::Status::kSuccess) {
      PyErr_Format(PyExc_ValueError, "set_cpu_isa: this CPU cannot run the '%s' path (best: %s)",
                   name, bitpress::cpu_isa_name(bitpress::best_cpu_isa()));
      return nullptr;
    }
    Py_RETURN_NONE;
  }
  PyErr_Format(PyExc_ValueError,
               "set_cpu_isa: isa must be 'scalar', 'avx2', 'avx512', 'amx' or None, got '%s'",
               name);
  return nullptr;
}

PyObject* py_set_poison_outputs(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  const bool prev = bitpress::glue::poison_outputs().exchange(on != 0);
  return PyBool_FromLong(prev);
}

// int4_cpu_path(name or None) -> str: force int4_gemm's CPU path ("auto", "fused", "dense"; None
// leaves it) and return the one in force. int4_cpu_path_choices(clear=False) -> list[str]: the
// measured choices of the auto mode (csrc/int4/int4_gemm_dense_torch.cpp); clear=True forgets them.
PyObject* py_int4_cpu_path(PyObject*, PyObject* arg) {
  namespace d = bitpress::int4_dense;
  if (arg != Py_None) {
    const char* name = PyUnicode_AsUTF8(arg);
    if (!name) return nullptr;
    d::Mode m;
    if (!d::mode_from_name(name, &m)) {
      PyErr_Format(PyExc_ValueError,
                   "int4_cpu_path: mode must be 'auto', 'fused', 'dense' or None, got '%s'", name);
      return nullptr;
    }
    d::set_mode(m);
  }
  return PyUnicode_FromString(d::mode_name(d::mode()));
}

PyObject* py_int4_cpu_path_choices(PyObject*, PyObject* arg) {
  namespace d = bitpress::int4_dense;
  const int clear = PyObject_IsTrue(arg);
  if (clear < 0) return nullptr;
  PyObject* list = PyList_New(0);
  if (!list) return nullptr;
  for (const std::string& line : d::choices()) {
    PyObject* s = PyUnicode_FromString(line.c_str());
    if (!s || PyList_Append(list, s) < 0) {
      Py_XDECREF(s);
      Py_DECREF(list);
      return nullptr;
    }
    Py_DECREF(s);
  }
  if (clear) d::clear_choices();
  return list;
}

PyMethodDef kMethods[] = {
    {"cpu_features", py_cpu_features, METH_NOARGS, "CPU features the kernels can use."},
    {"cuda_archs", py_cuda_archs, METH_NOARGS, "CUDA archs compiled into this extension."},
    {"with_cuda", py_with_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {"cpu_isa", py_cpu_isa, METH_NOARGS, "The CPU kernel path in use."},
    {"best_cpu_isa", py_best_cpu_isa, METH_NOARGS, "The best CPU kernel path of this CPU."},
    {"set_cpu_isa", py_set_cpu_isa, METH_O, "Force a CPU kernel path; None resets."},
    {"set_poison_outputs", py_set_poison_outputs, METH_O,
     "Fill op outputs with NaN / INT_MIN before kernels write them; returns the previous flag."},
    {"int4_cpu_path", py_int4_cpu_path, METH_O,
     "Force int4_gemm's CPU path ('auto', 'fused', 'dense'; None keeps it); returns the mode."},
    {"int4_cpu_path_choices", py_int4_cpu_path_choices, METH_O,
     "The auto mode's measured choices (list of str); a true argument clears them after."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", "bitpress kernels (torch ops bitpress::*)", -1,
                       kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&kModule);
  if (m) PyModule_AddStringConstant(m, "__version__", BITPRESS_VERSION_STRING);
  return m;
}
