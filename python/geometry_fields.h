// The geometry structs' bindings (JointGeometry, DenseConvGeometry, InvertedResidualGeometry) from
// one list of integer fields each: a keyword-only constructor that requires every field and refuses
// unknown names, and a read-only attribute per field. The convolution fields all three share are
// listed once (conv_fields).
#pragma once

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "enum_names.h"

namespace lwk_bind {

template <class G>
struct IntField {
  const char* name;
  int64_t G::*member;
};

// batch, sizes, kernel, stride, padding and dilation: the fields every geometry has.
template <class G>
std::vector<IntField<G>> conv_fields() {
  return {{"batch", &G::batch},       {"in_channels", &G::in_channels},
          {"in_h", &G::in_h},         {"in_w", &G::in_w},
          {"out_channels", &G::out_channels}, {"out_h", &G::out_h},
          {"out_w", &G::out_w},       {"kernel_h", &G::kernel_h},
          {"kernel_w", &G::kernel_w}, {"stride_h", &G::stride_h},
          {"stride_w", &G::stride_w}, {"pad_h", &G::pad_h},
          {"pad_w", &G::pad_w},       {"dil_h", &G::dil_h},
          {"dil_w", &G::dil_w}};
}

// Binds the constructor G(**kwargs) and the fields' attributes. `extra_names` are the other
// keywords it accepts; `set_extras(g, kwargs)` reads them (and says which are required).
template <class G, class SetExtras>
void bind_geometry(pybind11::class_<G>& cls, const std::vector<IntField<G>>& fields,
                   std::vector<std::string> extra_names, SetExtras set_extras) {
  namespace py = pybind11;
  const std::string type_name = py::str(cls.attr("__name__"));
  cls.def(py::init([fields, extra_names, set_extras, type_name](const py::kwargs& kwargs) {
    for (const auto& item : kwargs) {
      const std::string key = py::str(item.first);
      const bool known =
          std::any_of(fields.begin(), fields.end(), [&](const IntField<G>& f) { return key == f.name; }) ||
          std::find(extra_names.begin(), extra_names.end(), key) != extra_names.end();
      if (!known) throw py::type_error(type_name + "() got an unexpected keyword argument '" + key + "'");
    }
    G g;
    for (const auto& f : fields) {
      if (!kwargs.contains(f.name)) {
        throw py::type_error(type_name + "() missing keyword argument '" + f.name + "'");
      }
      g.*(f.member) = kwargs[f.name].template cast<int64_t>();
    }
    set_extras(g, kwargs);
    return g;
  }));
  for (const auto& f : fields) {
    const auto member = f.member;
    cls.def_property_readonly(f.name, [member](const G& g) { return g.*member; });
  }
}

// The required "layout" keyword ("nchw" or "nhwc").
template <class G>
void set_layout(G& g, const pybind11::kwargs& kwargs, const char* type_name) {
  if (!kwargs.contains("layout")) {
    throw pybind11::type_error(std::string(type_name) + "() missing keyword argument 'layout'");
  }
  g.layout = layout_from_name(kwargs["layout"].template cast<std::string>());
}

}  // namespace lwk_bind
