// The kernels' operand structs (JointTensors, InvertedResidualTensors) from what crosses the
// binding: data addresses (0 for "absent", addresses.h) and activation names. The caller sets the
// input and output (x, residual, y): addresses for a single call, slots in a CallSequence.
#pragma once

#include <cstdint>
#include <string>

#include "../csrc/inverted_residual.h"
#include "../csrc/joint_block.h"
#include "addresses.h"
#include "enum_names.h"

namespace lwk_bind {

template <typename T>
lwk::JointTensors<T> joint_operands(std::uintptr_t dw_weight, std::uintptr_t dw_scale,
                                    std::uintptr_t dw_shift, const std::string& mid_act,
                                    std::uintptr_t pw_scale, std::uintptr_t pw_shift,
                                    const std::string& out_act) {
  lwk::JointTensors<T> t;
  t.dw_weight = as_ptr<T>(dw_weight);
  t.dw_scale = as_ptr<T>(dw_scale);
  t.dw_shift = as_ptr<T>(dw_shift);
  t.mid_act = activation_from_name(mid_act);
  t.pw_scale = as_ptr<T>(pw_scale);
  t.pw_shift = as_ptr<T>(pw_shift);
  t.out_act = activation_from_name(out_act);
  return t;
}

template <typename T>
lwk::InvertedResidualTensors<T> inverted_residual_operands(
    std::uintptr_t expand_scale, std::uintptr_t expand_shift, const std::string& expand_act,
    std::uintptr_t dw_weight, std::uintptr_t dw_scale, std::uintptr_t dw_shift,
    const std::string& mid_act, std::uintptr_t project_scale, std::uintptr_t project_shift,
    const std::string& out_act) {
  lwk::InvertedResidualTensors<T> t;
  t.expand_scale = as_ptr<T>(expand_scale);
  t.expand_shift = as_ptr<T>(expand_shift);
  t.expand_act = activation_from_name(expand_act);
  t.dw_weight = as_ptr<T>(dw_weight);
  t.dw_scale = as_ptr<T>(dw_scale);
  t.dw_shift = as_ptr<T>(dw_shift);
  t.mid_act = activation_from_name(mid_act);
  t.project_scale = as_ptr<T>(project_scale);
  t.project_shift = as_ptr<T>(project_shift);
  t.out_act = activation_from_name(out_act);
  return t;
}

}  // namespace lwk_bind
