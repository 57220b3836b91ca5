// fusedlm._C: a Python module with no functions. Importing it loads this shared library, whose
// static TORCH_LIBRARY / TORCH_LIBRARY_IMPL blocks (csrc/torch/*.cpp) register every fusedlm op
// with the dispatcher; Python then reaches the ops as torch.ops.fusedlm.*.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
