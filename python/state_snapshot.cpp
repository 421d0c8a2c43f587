// StateSnapshot: the check behind lwkernels/cpu/state_watch.py, whether what a replayed call read
// is still what it was. It walks a few hundred entries per call of a whole model, whose Python
// objects are cold in the caches after the kernels ran; done by the interpreter, one dependent miss
// at a time, it took 5% of a MobileNetV2 call at batch 1. Here the lookups are independent loads
// the core overlaps. Pure Python C API: it reads tensors' `_version` like Python code does.
//
// Two shortcuts, each with the full check behind it:
// - Entries are grouped by dict. CPython before 3.14 stamps a dict with a new version tag whenever
//   it is changed (PEP 509), so a group whose dict carries the tag seen when the group last passed
//   in full is unchanged without looking its keys up: one cache line per dict instead of three or
//   four per key (a fused MobileNetV2 watches ~1400 keys of ~480 dicts). A new tag (the dict was
//   written, perhaps with the same values) means the full check, whose pass records the new tag.
//   Where the tags cannot be trusted (3.14, or a self-test on first use fails) every check is full.
// - `_version` is TensorBase's getset descriptor: it is looked up once per tensor class and its
//   getter called directly (what attribute access ends in, minus the lookup through the class's
//   bases); a tensor of another class, or a class that redefines `_version`, goes through getattr.
//
// It holds borrowed pointers: the StateWatch that builds it keeps every object in its own lists
// (which the garbage collector sees, so cycles through a watch stay collectable) and drops the
// snapshot before it changes them.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

namespace py = pybind11;

namespace {

#if PY_VERSION_HEX < 0x030E0000
#define LWK_DICT_VERSION_TAGS 1
// PyDictObject::ma_version_tag (deprecated since 3.12, gone in 3.14).
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
#endif
inline uint64_t dict_tag(PyObject* d) { return reinterpret_cast<PyDictObject*>(d)->ma_version_tag; }
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

// Whether writing a dict changes its tag on this interpreter: setting a new key, rebinding one
// (also to an equal but distinct object), deleting and clearing. Checked once, on first use.
bool dict_tags_work() {
  static const bool works = [] {
    py::dict d;
    py::str key("k");
    auto changes = [&](auto write) {
      const uint64_t before = dict_tag(d.ptr());
      write();
      return dict_tag(d.ptr()) != before;
    };
    return changes([&] { d[key] = py::float_(1.5); }) && changes([&] { d[key] = py::float_(1.5); }) &&
           changes([&] { PyDict_DelItem(d.ptr(), key.ptr()); }) &&
           changes([&] { d[key] = py::none(); }) && changes([&] { PyDict_Clear(d.ptr()); });
  }();
  return works;
}
#else
inline uint64_t dict_tag(PyObject*) { return 0; }
bool dict_tags_work() { return false; }
#endif

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
    // Grouped by mapping, each group's dict tag unverified until its first full pass.
    std::stable_sort(entries_.begin(), entries_.end(),
                     [](const Entry& a, const Entry& b) { return a.mapping < b.mapping; });
    const bool tags = dict_tags_work();
    for (std::size_t i = 0; i < entries_.size();) {
      std::size_t j = i;
      while (j < entries_.size() && entries_[j].mapping == entries_[i].mapping) ++j;
      groups_.push_back({entries_[i].mapping, i, j, tags && PyDict_Check(entries_[i].mapping), false, 0});
      i = j;
    }
    version_name_ = py::str("_version");
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      versions_.push_back({tensors[i].ptr(), versions[i].cast<long long>(), Py_TYPE(tensors[i].ptr()), nullptr,
                           nullptr});
      Version& v = versions_.back();
      py::object descr = py::reinterpret_steal<py::object>(
          PyObject_GetAttr(reinterpret_cast<PyObject*>(v.type), version_name_.ptr()));
      if (!descr) {
        PyErr_Clear();
      } else if (Py_TYPE(descr.ptr()) == &PyGetSetDescr_Type) {
        PyGetSetDef* def = reinterpret_cast<PyGetSetDescrObject*>(descr.ptr())->d_getset;
        v.get = def->get;
        v.closure = def->closure;
        descriptors_.push_back(descr);  // (alive while the getter is used)
      }
    }
    for (auto e : empty) empty_.push_back(e.ptr());
    for (std::size_t i = 0; i < objects.size(); ++i) types_.push_back({objects[i].ptr(), types[i].ptr()});
  }

  bool unchanged() {
    for (Group& g : groups_) {
      uint64_t tag = 0;
      if (g.tagged) {
        tag = dict_tag(g.mapping);
        if (g.verified && tag == g.tag) continue;
      }
      for (std::size_t i = g.begin; i < g.end; ++i) {
        const Entry& e = entries_[i];
        if (lookup(e.mapping, e.key) != e.value) return false;
      }
      if (g.tagged) {
        g.tag = tag;
        g.verified = true;
      }
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
      PyObject* version = v.get != nullptr && Py_TYPE(v.tensor) == v.type
                              ? v.get(v.tensor, v.closure)
                              : PyObject_GetAttr(v.tensor, version_name_.ptr());
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
  // entries_[begin, end) share `mapping`; `tag` is its dict's version tag when they last all passed.
  struct Group {
    PyObject* mapping;
    std::size_t begin, end;
    bool tagged, verified;
    uint64_t tag;
  };
  struct Version {
    PyObject* tensor;
    long long version;
    PyTypeObject* type;  // the tensor's class when watched; `get` serves that class
    getter get;
    void* closure;
  };
  struct Typed {
    PyObject *object, *type;
  };
  std::vector<Entry> entries_;
  std::vector<Group> groups_;
  std::vector<Version> versions_;
  std::vector<PyObject*> empty_;
  std::vector<Typed> types_;
  std::vector<py::object> descriptors_;
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
  m.def("dict_version_tags_work", &dict_tags_work,
        "Whether StateSnapshot trusts dicts' version tags on this interpreter (see python/state_snapshot.cpp).");
}
