// Multi-LoRA for batches with few tokens per slot (decode), on CPU, in one call per projection.
//
// y[t, slice i] += scale[s] * (x[t] @ A_i[s]^T) @ B_i[s]^T for every LoRA token t of slot s.
// The torch path needs ~10 small ops per projection for this, each a dispatch and a pass over a
// cache the base GEMM just flushed; here the shrink reads each slot's A once for all of the slot's
// tokens, the expand reads each B row once, and both run on torch's own thread pool.
// Launched by kernels/cpu_decode.py, which holds the shapes and the contract; checked against
// kernels/reference.py.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

// The decode layout caps tokens per slot (kernels/cpu_lora.py: MAX_TOKENS_PER_SLOT); an expand tile
// of kMaxCount x kChunk fp32 accumulators then stays in L1.
constexpr int64_t kMaxCount = 32;
constexpr int64_t kChunk = 128;

template <typename T>
void run(at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const std::vector<at::Tensor>& bs,
         const at::Tensor& ids_t, const at::Tensor& slots_t, const at::Tensor& starts_t,
         const at::Tensor& counts_t, const at::Tensor& ranks_t, const float* scale) {
  const int64_t K = x.size(1), nR = a.size(2), n = static_cast<int64_t>(bs.size()), R = nR / n;
  const int64_t G = slots_t.size(0), TL = ids_t.size(0);
  const int64_t* ids = ids_t.data_ptr<int64_t>();
  const int32_t* slots = slots_t.data_ptr<int32_t>();
  const int32_t* starts = starts_t.data_ptr<int32_t>();
  const int32_t* counts = counts_t.data_ptr<int32_t>();
  const int32_t* ranks = ranks_t.data_ptr<int32_t>();
  const T* xp = x.data_ptr<T>();
  const T* ap = a.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const int64_t ldx = x.stride(0), ldy = y.stride(0);

  // The expand's tiles: column chunks of every slice, each over every slot.
  std::vector<int64_t> chunk_slice, chunk_c0, chunk_c1, offsets(n), b_slot_stride(n), b_rank_stride(n);
  std::vector<const T*> b_data(n);  // each B is [S, out_i, R] with out_i unit-stride
  int64_t offset = 0;
  for (int64_t i = 0; i < n; ++i) {
    offsets[i] = offset;
    b_data[i] = bs[i].data_ptr<T>();
    b_slot_stride[i] = bs[i].stride(0);
    b_rank_stride[i] = bs[i].stride(2);
    const int64_t width = bs[i].size(1);
    for (int64_t c = 0; c < width; c += kChunk) {
      chunk_slice.push_back(i);
      chunk_c0.push_back(c);
      chunk_c1.push_back(std::min(width, c + kChunk));
    }
    offset += width;
  }
  const int64_t tiles = static_cast<int64_t>(chunk_slice.size()) * G;
  std::vector<float> v(TL * nR);
  float* vp = v.data();

  // One parallel region for both phases: waking torch's OpenMP workers costs more than a barrier,
  // and a decode step makes four of these calls per layer.
  const int threads = at::get_num_threads();
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    // Shrink, one slot per task: v[token, all slices] = x[token] @ A[slot], with every slice's A
    // columns side by side (the k-major layout), so the innermost loop is one contiguous nR row.
#pragma omp for schedule(static)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t s = slots[g], start = starts[g], cnt = counts[g], rank = ranks[g];
      float* vg = vp + start * nR;
      std::fill(vg, vg + cnt * nR, 0.f);
      const T* as = ap + s * K * nR;
      for (int64_t k = 0; k < K; ++k) {
        const T* arow = as + k * nR;
        for (int64_t j = 0; j < cnt; ++j) {
          const float xv = static_cast<float>(xp[ids[start + j] * ldx + k]);
          float* vr = vg + j * nR;
#pragma omp simd
          for (int64_t c = 0; c < nR; ++c) vr[c] += xv * static_cast<float>(arow[c]);
        }
      }
      // A past a slot's real rank may hold anything: zero what it produced, the expand skips it.
      if (rank < R) {
        for (int64_t j = 0; j < cnt; ++j)
          for (int64_t i = 0; i < n; ++i)
            std::fill(vg + j * nR + i * R + rank, vg + j * nR + (i + 1) * R, 0.f);
      }
      if (scale != nullptr) {
        const float f = scale[s];
        for (int64_t e = 0; e < cnt * nR; ++e) vg[e] *= f;
      }
    }
    // (the implicit barrier of the loop above: every v row is complete)

    // Expand, one (column chunk of a slice, slot) tile per task: the delta is summed in fp32 and
    // rounded once into y, as the reference does.
    float acc[kMaxCount * kChunk];
#pragma omp for schedule(static)
    for (int64_t w = 0; w < tiles; ++w) {
      const int64_t ch = w / G, g = w % G;
      const int64_t i = chunk_slice[ch], c0 = chunk_c0[ch], width = chunk_c1[ch] - c0;
      const int64_t s = slots[g], start = starts[g], cnt = counts[g], rank = ranks[g];
      const T* bs_c0 = b_data[i] + s * b_slot_stride[i] + c0;
      const int64_t ldb = b_rank_stride[i];
      std::fill(acc, acc + cnt * width, 0.f);
      for (int64_t r = 0; r < rank; ++r) {
        const T* brow = bs_c0 + r * ldb;
        for (int64_t j = 0; j < cnt; ++j) {
          const float vv = vp[(start + j) * nR + i * R + r];
          float* ar = acc + j * width;
#pragma omp simd
          for (int64_t c = 0; c < width; ++c) ar[c] += vv * static_cast<float>(brow[c]);
        }
      }
      for (int64_t j = 0; j < cnt; ++j) {
        T* yr = yp + ids[start + j] * ldy + offsets[i] + c0;
        const float* ar = acc + j * width;
        for (int64_t c = 0; c < width; ++c)
          yr[c] = static_cast<T>(static_cast<float>(yr[c]) + static_cast<float>(static_cast<T>(ar[c])));
      }
    }
  }
}

void check(const at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const std::vector<at::Tensor>& bs,
           const at::Tensor& ids, const at::Tensor& slots, const at::Tensor& starts, const at::Tensor& counts,
           const at::Tensor& ranks, const c10::optional<at::Tensor>& scale) {
  TORCH_CHECK(!bs.empty(), "lora_decode: no B slices");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && a.dim() == 3, "lora_decode: x, y 2-D and A 3-D");
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu() && a.device().is_cpu(), "lora_decode: CPU tensors");
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && a.scalar_type() == y.scalar_type(),
              "lora_decode: x, y, A and B share one dtype");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1 && a.is_contiguous(), "lora_decode: unit-stride rows, A contiguous");
  const int64_t T = y.size(0), S = a.size(0), K = a.size(1), nR = a.size(2), n = static_cast<int64_t>(bs.size());
  TORCH_CHECK(x.size(0) == T && x.size(1) == K && nR % n == 0, "lora_decode: x [T, K], A [S, K, n * R]");
  int64_t width = 0;
  for (const at::Tensor& b : bs) {
    TORCH_CHECK(b.dim() == 3 && b.size(0) == S && b.size(2) == nR / n && b.stride(1) == 1 &&
                    b.scalar_type() == y.scalar_type() && b.device().is_cpu(),
                "lora_decode: each B is [S, out_i, R] with out_i unit-stride");
    width += b.size(1);
  }
  TORCH_CHECK(width == y.size(1), "lora_decode: y's width is the sum of the B slices'");
  for (const at::Tensor* t : {&slots, &starts, &counts, &ranks})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous() && t->device().is_cpu() &&
                    t->numel() == slots.numel(), "lora_decode: slot tables are [A] int32 on CPU");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous() && ids.device().is_cpu(),
              "lora_decode: token ids int64 on CPU");
  const int64_t TL = ids.numel();
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t t = 0; t < TL; ++t) TORCH_CHECK(id[t] >= 0 && id[t] < T, "lora_decode: token id out of range");
  for (int64_t g = 0; g < slots.numel(); ++g) {
    const int32_t s = slots.data_ptr<int32_t>()[g], st = starts.data_ptr<int32_t>()[g];
    const int32_t c = counts.data_ptr<int32_t>()[g], r = ranks.data_ptr<int32_t>()[g];
    TORCH_CHECK(s >= 0 && s < S && st >= 0 && c >= 0 && c <= kMaxCount && st + c <= TL && r >= 0 && r <= nR / n,
                "lora_decode: slot table entry out of range");
  }
  if (scale.has_value())
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->is_contiguous() && scale->numel() == S &&
                    scale->device().is_cpu(), "lora_decode: scale is [S] float32 on CPU");
}

}  // namespace

void lora_decode(at::Tensor y, at::Tensor x, at::Tensor a, std::vector<at::Tensor> bs, at::Tensor ids,
                 at::Tensor slots, at::Tensor starts, at::Tensor counts, at::Tensor ranks,
                 c10::optional<at::Tensor> scale) {
  check(y, x, a, bs, ids, slots, starts, counts, ranks, scale);
  const float* sp = scale.has_value() ? scale->data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "lora_decode", [&] {
    run<scalar_t>(y, x, a, bs, ids, slots, starts, counts, ranks, sp);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lora_decode", &lora_decode, "Multi-LoRA shrink and expand for few tokens per slot, in place on y");
  m.attr("MAX_COUNT") = kMaxCount;
}
