// StateSnapshot: the check behind lwkernels/cpu/state_watch.py, whether what a replayed call read
// is still what it was. It walks a few hundred entries per call of a whole model, whose Python
// objects are cold in the caches after the kernels ran; done by the interpreter, one dependent miss
// at a time, it took 5% of a MobileNetV2 call at batch 1. Here the lookups are independent loads
// the core overlaps. Pure Python C API: it reads tensors' `_version` like Python code does.
//
// It holds borrowed pointers: the StateWatch that builds it keeps every object in its own lists
// (which the garbage collector sees, so cycles through a watch stay collectable) and drops the
// snapshot before it changes them.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <vector>

namespace py = pybind11;

namespace {

class StateSnapshot {
 public:
  // dicts[i][keys[i]] must be values[i] (None: absent); tensors[i]._version must be versions[i];
  // every object in `empty` must have length 0; objects[i] must be of class types[i].
  StateSnapshot(const py::list& dicts, const py::list& keys, const py::list& values, const py::list& tensors,
                const py::list& versions, const py::list& empty, const py::list& objects, const py::list& types) {
    if (dicts.size() != keys.size() || dicts.size() != values.size() || tensors.size() != versions.size() ||
        objects.size() != types.size()) {
      throw std::invalid_argument("StateSnapshot: mismatched list lengths");
    }
    for (std::size_t i = 0; i < dicts.size(); ++i) {
      entries_.push_back({dicts[i].ptr(), keys[i].ptr(), values[i].ptr()});
    }
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      versions_.push_back({tensors[i].ptr(), versions[i].cast<long long>()});
    }
    for (auto e : empty) empty_.push_back(e.ptr());
    for (std::size_t i = 0; i < objects.size(); ++i) types_.push_back({objects[i].ptr(), types[i].ptr()});
    version_name_ = py::str("_version");
  }

  bool unchanged() const {
    for (const auto& e : entries_) {
      if (lookup(e.mapping, e.key) != e.value) return false;
    }
    for (const auto& t : types_) {
      if (reinterpret_cast<PyObject*>(Py_TYPE(t.object)) != t.type) return false;
    }
    for (PyObject* c : empty_) {
      const Py_ssize_t n = PyDict_Check(c) ? PyDict_GET_SIZE(c) : PyObject_Length(c);
      if (n != 0) {
        if (n < 0) PyErr_Clear();
        return false;
      }
    }
    for (const auto& v : versions_) {
      PyObject* version = PyObject_GetAttr(v.tensor, version_name_.ptr());
      if (version == nullptr) {
        PyErr_Clear();
        return false;
      }
      const long long now = PyLong_AsLongLong(version);
      Py_DECREF(version);
      if (now == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return false;
      }
      if (now != v.version) return false;
    }
    return true;
  }

 private:
  // mapping[key], borrowed, None when absent (as dict.get); nullptr when the lookup fails.
  static PyObject* lookup(PyObject* mapping, PyObject* key) {
    if (PyDict_Check(mapping)) {
      PyObject* got = PyDict_GetItemWithError(mapping, key);
      if (got == nullptr && PyErr_Occurred()) PyErr_Clear();
      return got != nullptr ? got : Py_None;
    }
    PyObject* got = PyObject_GetItem(mapping, key);  // a class's mappingproxy
    if (got == nullptr) {
      const bool absent = PyErr_ExceptionMatches(PyExc_KeyError);
      PyErr_Clear();
      return absent ? Py_None : nullptr;
    }
    Py_DECREF(got);  // (the class keeps it alive; only its identity is compared)
    return got;
  }

  struct Entry {
    PyObject *mapping, *key, *value;
  };
  struct Version {
    PyObject* tensor;
    long long version;
  };
  struct Typed {
    PyObject *object, *type;
  };
  std::vector<Entry> entries_;
  std::vector<Version> versions_;
  std::vector<PyObject*> empty_;
  std::vector<Typed> types_;
  py::str version_name_;
};

}  // namespace

void bind_state_snapshot(py::module_& m) {
  py::class_<StateSnapshot>(m, "StateSnapshot")
      .def(py::init<const py::list&, const py::list&, const py::list&, const py::list&, const py::list&,
                    const py::list&, const py::list&, const py::list&>(),
           py::arg("dicts"), py::arg("keys"), py::arg("values"), py::arg("tensors"), py::arg("versions"),
           py::arg("empty"), py::arg("objects"), py::arg("types"))
      .def("unchanged", &StateSnapshot::unchanged,
           "True while every watched entry, version counter, empty container and class is as it was.");
}
