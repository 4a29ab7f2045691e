// The day loops of kgml_peft/model/recurrence.py, the same ATen calls in the same order, run
// from C++ (built on first use by kgml_peft/model/native.py). A day of a GRU layer is five small
// ops forward and four backward; from Python each costs an interpreter round trip on top of
// ATen's own dispatch, about a fifth of the loop at 8-64 rows of hidden size 32 on a CPU. The
// results are the Python loop's to the last bit (tests/test_native_loop.py): only where the calls
// are made from changes. Argument layouts are documented at the Python functions.
#include <torch/extension.h>

#include <vector>

// _forward_days: in place on the day-major buffers ga [T, B, 3H], n [T, B, H], hs [T, B, H]
// from state h [B, H]; weight_t is [H, 3H] (one weight) or [G, H, 3H] (G groups of rows).
void forward_days(torch::Tensor ga, torch::Tensor n, torch::Tensor hs, torch::Tensor h,
                  torch::Tensor weight_t) {
  const int64_t size = hs.size(2);
  const int64_t groups = weight_t.dim() == 3 ? weight_t.size(0) : 0;
  const std::vector<torch::Tensor> days = ga.unbind(0);
  const std::vector<torch::Tensor> cand = n.unbind(0);
  std::vector<torch::Tensor> states = hs.unbind(0);
  for (size_t day = 0; day < days.size(); ++day) {
    const torch::Tensor& full = days[day];
    if (groups) {
      full.view({groups, -1, 3 * size}).baddbmm_(h.view({groups, -1, size}), weight_t);
    } else {
      full.addmm_(h, weight_t);
    }
    full.narrow(1, 0, 2 * size).sigmoid_();
    cand[day].addcmul_(full.narrow(1, 0, size), full.narrow(1, 2 * size, size)).tanh_();
    h = at::lerp_out(states[day], cand[day], h, full.narrow(1, size, size));  // (1 - z) n + z h
  }
}

// The backward loop of _GruLayer: walks the days back, filling dgh [T, B, 3, H] with
// dh[day] * coef[day] (dh [T, B, H] gains the carried gradient in place) and returning the
// gradient of the start state. w_hh is [3H, H] or [G, 3H, H]; z [T, B, H] the update gates.
torch::Tensor backward_days(torch::Tensor dh, torch::Tensor coef, torch::Tensor dgh, torch::Tensor z,
                            torch::Tensor w_hh) {
  const int64_t days = dh.size(0), batch = dh.size(1), size = dh.size(2);
  const int64_t groups = w_hh.dim() == 3 ? w_hh.size(0) : 0;
  const std::vector<torch::Tensor> dh_days = dh.unbind(0);
  const std::vector<torch::Tensor> coef_days = coef.unbind(0);
  std::vector<torch::Tensor> dgh_days = dgh.unbind(0);
  const std::vector<torch::Tensor> z_days = z.unbind(0);
  torch::Tensor carry;
  for (int64_t day = days - 1; day >= 0; --day) {
    if (carry.defined()) {
      dh_days[day].add_(carry);
    }
    torch::Tensor d_gates = at::mul_out(dgh_days[day], dh_days[day].unsqueeze(1), coef_days[day]);
    torch::Tensor through = groups
        ? at::bmm(d_gates.view({groups, -1, 3 * size}), w_hh).view({batch, size})
        : at::mm(d_gates.view({batch, 3 * size}), w_hh);
    carry = at::addcmul(through, dh_days[day], z_days[day]);
  }
  return carry;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward_days", &forward_days, "A GRU layer's day loop, in place on day-major buffers");
  m.def("backward_days", &backward_days, "The day loop of a GRU layer's backward pass");
}
