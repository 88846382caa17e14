// Decode attention on CPU, reading K/V in place from the paged cache: one query token per sequence.
//
// out[d, h] = softmax(scale * q[d, h] . K_d[p] over p in [first_d, pos_d]) @ V_d, where K_d[p] is
// k_cache[table[d, p / bs], p % bs, h / G] (G query heads share a KV head) and first_d is 0 or,
// with a sliding window, pos_d - window + 1. The torch path gathers every sequence's blocks into a
// dense copy and runs SDPA under a mask; at decode sizes both cost many times the arithmetic.
// Launched by kernels/cpu_attention.py; checked against kernels/reference.py.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <numeric>
#include <type_traits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

// A row of n values as fp32: itself when it is fp32, else converted into tmp.
template <typename T>
inline const float* as_float(const T* row, int64_t n, float* tmp) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else {
    for (int64_t c = 0; c < n; ++c) tmp[c] = static_cast<float>(row[c]);
    return tmp;
  }
}

inline float dot(const float* a, const float* b, int64_t n) {
  Vec acc(0.f);
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) acc = at::vec::fmadd(Vec::loadu(a + c), Vec::loadu(b + c), acc);
  float s = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
  for (; c < n; ++c) s += a[c] * b[c];
  return s;
}

// acc[0:n] += w * v[0:n]
inline void axpy(float w, const float* v, float* acc, int64_t n) {
  const Vec wv(w);
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) at::vec::fmadd(wv, Vec::loadu(v + c), Vec::loadu(acc + c)).store(acc + c);
  for (; c < n; ++c) acc[c] += w * v[c];
}

// HD: head_dim as a compile-time constant for the common sizes (0: read at run time), so the
// loops over a row unroll and a key row stays in registers for the G heads that use it.
template <typename T, int HD>
void run(at::Tensor& out, const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
         const at::Tensor& tables, const at::Tensor& positions, int64_t window, float scale) {
  const int64_t D = q.size(0), H = q.size(1), Dh = HD > 0 ? HD : q.size(2);
  const int64_t bs = kc.size(1), KVH = kc.size(2), G = H / KVH, width = tables.size(1);
  const int64_t q_row = q.stride(0), q_head = q.stride(1);
  const int64_t block_stride = kc.stride(0), pos_stride = kc.stride(1);
  const T* qp = q.data_ptr<T>();
  const T* kp = kc.data_ptr<T>();
  const T* vp = vc.data_ptr<T>();
  const int64_t* table = tables.data_ptr<int64_t>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  // A task is a sequence's KV heads [h0, h0 + hp), all of them unless that leaves threads idle: a
  // position's K (or V) row for every head is one contiguous run of the cache, which the hardware
  // prefetcher streams, where one head's slice of it is a strided 1/KVH of each block.
  int64_t hp = KVH;
  while (hp % 2 == 0 && D * (KVH / hp) < 2 * at::get_num_threads()) hp /= 2;
  const int64_t per_seq = KVH / hp, NQ = hp * G;  // NQ: the task's query heads, G per KV head
  at::parallel_for(0, D * per_seq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(NQ * Dh), acc(NQ * Dh), total(NQ), row(hp * Dh), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t d = task / per_seq, h0 = (task % per_seq) * hp;
      const int64_t last = pos[d], first = window > 0 ? std::max<int64_t>(0, last - window + 1) : 0;
      const int64_t L = last - first + 1;
      const int64_t* blocks = table + d * width;
      scores.resize(NQ * L);
      for (int64_t i = 0; i < NQ; ++i) {
        const T* qh = qp + d * q_row + (h0 * G + i) * q_head;
        for (int64_t c = 0; c < Dh; ++c) qf[i * Dh + c] = static_cast<float>(qh[c]) * scale;
      }
      for (int64_t p = first; p <= last; ++p) {
        const float* keys = as_float(kp + blocks[p / bs] * block_stride + (p % bs) * pos_stride + h0 * Dh, hp * Dh,
                                     row.data());
        for (int64_t i = 0; i < NQ; ++i) scores[i * L + (p - first)] = dot(qf.data() + i * Dh, keys + (i / G) * Dh, Dh);
      }
      for (int64_t i = 0; i < NQ; ++i) {
        float* si = scores.data() + i * L;
        const Vec m(*std::max_element(si, si + L));
        at::vec::map([m](Vec x) { return (x - m).exp(); }, si, si, L);
        total[i] = std::accumulate(si, si + L, 0.f);
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t p = first; p <= last; ++p) {
        const float* values = as_float(vp + blocks[p / bs] * block_stride + (p % bs) * pos_stride + h0 * Dh,
                                       hp * Dh, row.data());
        for (int64_t i = 0; i < NQ; ++i)
          axpy(scores[i * L + (p - first)], values + (i / G) * Dh, acc.data() + i * Dh, Dh);
      }
      for (int64_t i = 0; i < NQ; ++i) {
        T* o = op + d * H * Dh + (h0 * G + i) * Dh;
        const float inv = 1.f / total[i];
        for (int64_t c = 0; c < Dh; ++c) o[c] = static_cast<T>(acc[i * Dh + c] * inv);
      }
    }
  });
}

void check(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& tables,
           const at::Tensor& positions, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && kc.dim() == 4 && vc.dim() == 4, "paged_decode_attention: q 3-D, caches 4-D");
  TORCH_CHECK(q.device().is_cpu() && kc.device().is_cpu() && vc.device().is_cpu(), "paged_decode_attention: CPU tensors");
  TORCH_CHECK(kc.sizes() == vc.sizes() && kc.is_contiguous() && vc.is_contiguous(),
              "paged_decode_attention: K and V caches [blocks, block_size, kv_heads, head_dim], contiguous");
  TORCH_CHECK(q.scalar_type() == kc.scalar_type() && vc.scalar_type() == kc.scalar_type(),
              "paged_decode_attention: q and the caches share one dtype");
  const int64_t D = q.size(0), H = q.size(1), Dh = q.size(2), KVH = kc.size(2);
  TORCH_CHECK(q.stride(2) == 1 && Dh == kc.size(3) && KVH > 0 && H % KVH == 0,
              "paged_decode_attention: q [D, heads, head_dim] unit-stride, heads a multiple of kv_heads");
  TORCH_CHECK(tables.scalar_type() == at::kLong && tables.dim() == 2 && tables.size(0) == D &&
                  tables.is_contiguous() && tables.device().is_cpu(),
              "paged_decode_attention: block tables [D, width] int64 on CPU");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1 && positions.size(0) == D &&
                  positions.is_contiguous() && positions.device().is_cpu(),
              "paged_decode_attention: positions [D] int64 on CPU");
  TORCH_CHECK(window >= 0, "paged_decode_attention: window >= 0 (0 = none)");
  TORCH_CHECK(kc.size(1) > 0, "paged_decode_attention: block_size > 0");
  // Every block a query reads must be in its table and in the cache: the kernel reads them unchecked.
  const int64_t bs = kc.size(1), blocks = kc.size(0), width = tables.size(1);
  const int64_t* table = tables.data_ptr<int64_t>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t d = 0; d < D; ++d) {
    TORCH_CHECK(pos[d] >= 0 && pos[d] / bs < width, "paged_decode_attention: a position past its block table");
    const int64_t first = window > 0 ? std::max<int64_t>(0, pos[d] - window + 1) : 0;
    for (int64_t b = first / bs; b <= pos[d] / bs; ++b)
      TORCH_CHECK(table[d * width + b] >= 0 && table[d * width + b] < blocks,
                  "paged_decode_attention: a block id out of range");
  }
}

}  // namespace

at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor tables,
                                  at::Tensor positions, int64_t window, double scale) {
  check(q, k_cache, v_cache, tables, positions, window);
  at::Tensor out = at::empty({q.size(0), q.size(1) * q.size(2)}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "loraplane_paged_decode_attention", [&] {
    const float sc = static_cast<float>(scale);
    switch (q.size(2)) {
      case 64: run<scalar_t, 64>(out, q, k_cache, v_cache, tables, positions, window, sc); break;
      case 128: run<scalar_t, 128>(out, q, k_cache, v_cache, tables, positions, window, sc); break;
      default: run<scalar_t, 0>(out, q, k_cache, v_cache, tables, positions, window, sc);
    }
  });
  return out;
}
