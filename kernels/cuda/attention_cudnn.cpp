// Attention on cuDNN's fused scaled-dot-product attention through its graph API (NVIDIA's
// header-only frontend, fetched by tools/cudnn_frontend.sh): bf16 q, k, v with f32 statistics,
// the backward on cuDNN's deterministic algorithm, so that a replay's gradients keep the bits of
// the step without checkpointing. Graphs are built per device, shape, scale, mask and q/k/v
// layout, both directions at the first call of a key: a key cuDNN declines either way takes
// another path both ways, so a forward and its backward never mix paths by accident. o, dO, dq,
// dk and dv are [B, H, T, D] views of [B, T, H, D] memory (as the mma path's), so merging the
// heads again is a view; a dO or o in another layout is copied into that one.
#include "kernels/cuda/attention_cudnn.h"

#ifdef REMAT_HAVE_CUDNN_ATTENTION

#include <cudnn_frontend.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "kernels/cuda/attention_heads.h"
#include "kernels/cuda/cudnn_handle.h"
#include "runtime/cuda_devices.h"
#include "runtime/workspace.h"

namespace remat::cuda {

namespace {

namespace fe = cudnn_frontend;
using Graph = fe::graph::Graph;

enum Uid : int64_t { kQ = 1, kK, kV, kO, kStats, kDO, kDQ, kDK, kDV };

// What a pair of graphs is built for.
struct Key {
  int device = 0;
  std::array<int64_t, 4> shape{};     // B, H, T, D
  std::array<int64_t, 9> strides{};   // the B, H and T strides of q, k and v (D's is 1)
  bool causal = false;
  float scale = 0;
  bool operator==(const Key&) const = default;
};

struct KeyHash {
  size_t operator()(const Key& key) const {
    size_t h = std::hash<int>()(key.device) ^ (std::hash<bool>()(key.causal) << 1);
    auto mix = [&h](int64_t v) { h ^= std::hash<int64_t>()(v) + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2); };
    for (int64_t v : key.shape) mix(v);
    for (int64_t v : key.strides) mix(v);
    uint32_t bits;
    std::memcpy(&bits, &key.scale, sizeof bits);
    mix(bits);
    return h;
  }
};

struct Graphs {
  std::shared_ptr<Graph> forward, backward;
  int64_t forward_workspace = 0, backward_workspace = 0;
  std::string declined;  // why cuDNN declined the key; empty when both graphs are built
};

// The graphs built so far, and the lock every use of them holds (building, and queueing a graph
// on the shared handle).
std::mutex g_mutex;
std::unordered_map<Key, Graphs, KeyHash> g_graphs;

Key key_of(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale) {
  Key key{q.device().index, {q.size(0), q.size(1), q.size(2), q.size(3)}, {}, causal, static_cast<float>(scale)};
  int i = 0;
  for (const Tensor* x : {&q, &k, &v})
    for (int d = 0; d < 3; ++d) key.strides[i++] = x->strides()[d];
  return key;
}

// [B, H, T, D] dims with the given strides, as cuDNN's tensor attributes.
fe::graph::Tensor_attributes heads(const char* name, Uid uid, const Key& key, std::vector<int64_t> strides) {
  return fe::graph::Tensor_attributes()
      .set_name(name)
      .set_uid(uid)
      .set_dim({key.shape[0], key.shape[1], key.shape[2], key.shape[3]})
      .set_stride(std::move(strides));
}

// Strides of input `which` (0 q, 1 k, 2 v) of the key, and of the [B, T, H, D] layout.
std::vector<int64_t> input_strides(const Key& key, int which) {
  const int64_t* s = key.strides.data() + 3 * which;
  return {s[0], s[1], s[2], 1};
}
std::vector<int64_t> bthd_strides(const Key& key) {
  const int64_t h = key.shape[1], t = key.shape[2], d = key.shape[3];
  return {t * h * d, d, h * d, 1};
}

// `sm`: the compute capability to build for (90 for 9.0), or 0 for the current device's.
std::shared_ptr<Graph> new_graph(int sm) {
  auto graph = std::make_shared<Graph>();
  if (sm > 0) graph->set_sm_version(sm);
  graph->set_io_data_type(fe::DataType_t::BFLOAT16)
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  return graph;
}

// Queries attend to keys at or before their own position: the top-left aligned diagonal band.
template <typename Attributes>
void mask(Attributes& attributes, bool causal) {
  if (causal)
    attributes.set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT).set_diagonal_band_right_bound(0);
}

std::shared_ptr<Graph> forward_graph(const Key& key, int sm = 0) {
  auto graph = new_graph(sm);
  auto q = graph->tensor(heads("Q", kQ, key, input_strides(key, 0)));
  auto k = graph->tensor(heads("K", kK, key, input_strides(key, 1)));
  auto v = graph->tensor(heads("V", kV, key, input_strides(key, 2)));
  auto options = fe::graph::SDPA_attributes().set_name("attention").set_generate_stats(true).set_attn_scale(key.scale);
  mask(options, key.causal);
  auto [o, stats] = graph->sdpa(q, k, v, options);
  const int64_t b = key.shape[0], h = key.shape[1], t = key.shape[2], d = key.shape[3];
  o->set_output(true).set_uid(kO).set_dim({b, h, t, d}).set_stride(bthd_strides(key));
  stats->set_output(true).set_uid(kStats).set_data_type(fe::DataType_t::FLOAT).set_dim({b, h, t, 1}).set_stride(
      {h * t, t, 1, 1});
  return graph;
}

std::shared_ptr<Graph> backward_graph(const Key& key, int sm = 0) {
  auto graph = new_graph(sm);
  auto q = graph->tensor(heads("Q", kQ, key, input_strides(key, 0)));
  auto k = graph->tensor(heads("K", kK, key, input_strides(key, 1)));
  auto v = graph->tensor(heads("V", kV, key, input_strides(key, 2)));
  auto o = graph->tensor(heads("O", kO, key, bthd_strides(key)));
  auto d_o = graph->tensor(heads("dO", kDO, key, bthd_strides(key)));
  const int64_t b = key.shape[0], h = key.shape[1], t = key.shape[2];
  auto stats = graph->tensor(fe::graph::Tensor_attributes()
                                 .set_name("Stats")
                                 .set_uid(kStats)
                                 .set_dim({b, h, t, 1})
                                 .set_stride({h * t, t, 1, 1})
                                 .set_data_type(fe::DataType_t::FLOAT));
  // Deterministic: no atomics in dq's sums, so every replay gives the same gradients.
  auto options = fe::graph::SDPA_backward_attributes()
                     .set_name("attention_backward")
                     .set_attn_scale(key.scale)
                     .set_deterministic_algorithm(true);
  mask(options, key.causal);
  auto [dq, dk, dv] = graph->sdpa_backward(q, k, v, o, d_o, stats, options);
  for (auto [grad, uid] : {std::pair{dq, kDQ}, std::pair{dk, kDK}, std::pair{dv, kDV}})
    grad->set_output(true).set_uid(uid).set_dim({b, h, t, key.shape[3]}).set_stride(bthd_strides(key));
  return graph;
}

// Builds `graph`'s execution plan (cuDNN's heuristics' first choice that builds: the same for
// every call of the key). Returns why not, or "" when built.
std::string build(Graph& graph, cudnnHandle_t handle, int64_t& workspace) {
  auto why = [](const char* step, fe::error_t status) {
    return std::string(step) + ": " + status.get_message();
  };
  if (auto s = graph.validate(); s.is_bad()) return why("validate", s);
  if (auto s = graph.build_operation_graph(handle); s.is_bad()) return why("operation graph", s);
  if (auto s = graph.create_execution_plans({fe::HeurMode_t::A}); s.is_bad()) return why("execution plans", s);
  if (auto s = graph.check_support(handle); s.is_bad()) return why("support", s);
  if (auto s = graph.build_plans(handle); s.is_bad()) return why("build", s);
  if (auto s = graph.get_workspace_size(workspace); s.is_bad()) return why("workspace size", s);
  return "";
}

// The key's graphs, built at its first use; holds g_mutex (the caller's lock).
const Graphs& graphs_for(const Key& key) {
  auto found = g_graphs.find(key);
  if (found != g_graphs.end()) return found->second;
  Graphs graphs;
  cudnnHandle_t handle = cudnn_handle(key.device);
  try {
    graphs.forward = forward_graph(key);
    graphs.declined = build(*graphs.forward, handle, graphs.forward_workspace);
    if (graphs.declined.empty()) {
      graphs.backward = backward_graph(key);
      graphs.declined = build(*graphs.backward, handle, graphs.backward_workspace);
      if (!graphs.declined.empty()) graphs.declined = "backward: " + graphs.declined;
    } else {
      graphs.declined = "forward: " + graphs.declined;
    }
  } catch (const std::exception& e) {  // the frontend throws on some invalid graphs
    graphs.declined = e.what();
  }
  if (!graphs.declined.empty()) {
    std::fprintf(stderr,
                 "remat: cuDNN declined attention [B %lld, H %lld, T %lld, D %lld]%s (%s); using the path auto takes\n",
                 static_cast<long long>(key.shape[0]), static_cast<long long>(key.shape[1]),
                 static_cast<long long>(key.shape[2]), static_cast<long long>(key.shape[3]),
                 key.causal ? ", causal" : "", graphs.declined.c_str());
    graphs.forward.reset();
    graphs.backward.reset();
  }
  return g_graphs.emplace(key, std::move(graphs)).first->second;
}

void execute(const Graph& graph, const Key& key, std::unordered_map<int64_t, void*>& pack, int64_t workspace_bytes) {
  Tensor workspace = empty_workspace({std::max<int64_t>(workspace_bytes, 1)}, DType::u8, Device::cuda(key.device));
  auto status = graph.execute(cudnn_handle(key.device), pack, workspace.raw_data());
  REMAT_CHECK(status.is_good(), "attention (cudnn): cuDNN failed to run a graph it had built: ", status.get_message());
}

// Why cuDNN's frontend rejects `graph` in validation (attributes, shapes, layouts and its support
// checks for the target), or "".
std::string validation(Graph& graph) {
  try {
    auto status = graph.validate();
    return status.is_good() ? "" : status.get_message();
  } catch (const std::exception& e) {
    return e.what();
  }
}

}  // namespace

std::string cudnn_attention_graphs_invalid(const std::array<int64_t, 4>& shape, const std::array<int64_t, 9>& strides,
                                           bool causal, float scale, int sm) {
  const Key key{0, shape, strides, causal, scale};
  if (std::string why = validation(*forward_graph(key, sm)); !why.empty()) return "forward: " + why;
  if (std::string why = validation(*backward_graph(key, sm)); !why.empty()) return "backward: " + why;
  return "";
}

bool cudnn_attention_supported(const Tensor& q) {
  const int64_t d = q.size(3);
  if (q.dtype() != DType::bf16 || d < 8 || d > 128 || d % 8 != 0) return false;
  int major = 0;
  REMAT_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.device().index));
  return major >= 8;
}

std::optional<std::vector<Tensor>> attention_cudnn(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                                   bool causal, double scale) {
  const Tensor q = readable_heads(q_in), k = readable_heads(k_in), v = readable_heads(v_in);
  auto outputs = [&] {  // o, and the f32 log-sum-exp
    Tensor lse = Tensor::empty({q.size(0), q.size(1), q.size(2)}, DType::f32, q.device());
    return std::vector<Tensor>{empty_heads(q), lse};
  };
  if (q.numel() == 0) return outputs();
  const Key key = key_of(q, k, v, causal, scale);
  std::lock_guard lock(g_mutex);
  const Graphs& graphs = graphs_for(key);
  if (!graphs.forward) return std::nullopt;
  count_cuda_attention_call(CudaAttention::cudnn);
  std::vector<Tensor> out = outputs();
  const Tensor &o = out[0], &lse = out[1];
  std::unordered_map<int64_t, void*> pack = {{kQ, q.raw_data()}, {kK, k.raw_data()}, {kV, v.raw_data()},
                                             {kO, o.raw_data()}, {kStats, lse.raw_data()}};
  execute(*graphs.forward, key, pack, graphs.forward_workspace);
  return out;
}

std::optional<std::vector<Tensor>> attention_backward_cudnn(const Tensor& d_o_in, const Tensor& q_in,
                                                            const Tensor& k_in, const Tensor& v_in, const Tensor& o_in,
                                                            const Tensor& lse_in, bool causal, double scale) {
  const Tensor q = readable_heads(q_in), k = readable_heads(k_in), v = readable_heads(v_in);
  if (q.numel() == 0) return std::vector<Tensor>{empty_heads(q), empty_heads(q), empty_heads(q)};
  REMAT_CHECK(lse_in.dtype() == DType::f32, "attention (cudnn): expected the forward's f32 log-sum-exp, got ",
              dtype_name(lse_in.dtype()));
  const Key key = key_of(q, k, v, causal, scale);
  std::lock_guard lock(g_mutex);
  const Graphs& graphs = graphs_for(key);
  if (!graphs.backward) return std::nullopt;
  count_cuda_attention_call(CudaAttention::cudnn);
  const Tensor d_o = in_bthd_layout(d_o_in), o = in_bthd_layout(o_in), lse = lse_in.as_contiguous();
  Tensor dq = empty_heads(q), dk = empty_heads(q), dv = empty_heads(q);
  std::unordered_map<int64_t, void*> pack = {{kQ, q.raw_data()},   {kK, k.raw_data()},   {kV, v.raw_data()},
                                             {kO, o.raw_data()},   {kDO, d_o.raw_data()}, {kStats, lse.raw_data()},
                                             {kDQ, dq.raw_data()}, {kDK, dk.raw_data()}, {kDV, dv.raw_data()}};
  execute(*graphs.backward, key, pack, graphs.backward_workspace);
  return std::vector<Tensor>{dq, dk, dv};
}

}  // namespace remat::cuda

#else  // a build without cuDNN's frontend: the path is absent

namespace remat::cuda {

std::string cudnn_attention_graphs_invalid(const std::array<int64_t, 4>&, const std::array<int64_t, 9>&, bool, float,
                                           int) {
  return "this build has no cuDNN frontend";
}
bool cudnn_attention_supported(const Tensor&) { return false; }
std::optional<std::vector<Tensor>> attention_cudnn(const Tensor&, const Tensor&, const Tensor&, bool, double) {
  return std::nullopt;
}
std::optional<std::vector<Tensor>> attention_backward_cudnn(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                            const Tensor&, const Tensor&, bool, double) {
  return std::nullopt;
}

}  // namespace remat::cuda

#endif
