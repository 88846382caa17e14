// Multi-LoRA on CPU, in one call per projection, for decode and prompt batches alike.
//
// y[t, slice i] += scale[s] * (x[t] @ A_i[s]^T) @ B_i[s]^T for every LoRA token t of slot s.
// The torch path needs ~10 small ops per projection for this, each a dispatch and a pass over a
// cache the base GEMM just flushed; here the shrink reads each slot's A once for all of the slot's
// tokens, the expand reads each B row once, and both run on torch's own thread pool.
// Launched by kernels/cpu_kernel.py, which holds the shapes and the contract; checked against
// kernels/reference.py.

#include <torch/extension.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace {

// Both phases work on blocks of kTokens tokens x kCols* columns whose fp32 accumulators stay in
// vector registers (8 of 32 AVX-512 registers, 16 of 16 AVX2 ones), so each A or B element is
// loaded once per token block and no partial sum goes through memory.
constexpr int kTokens = 4;
constexpr int kColsShrink = 16;
constexpr int kColsExpand = 32;
// Shrink tasks: up to kTaskTokens tokens of one slot (a decode slot is one task, a prompt many).
// Expand tasks: a column chunk of a slice, for one slot. Both keep every thread busy when the
// batch has a single adapter.
constexpr int64_t kTaskTokens = 32;
constexpr int64_t kChunk = 128;

// acc[j][0:w] += sum_k lhs[j][k] * rhs[k * ld + 0:w] for J rows and k < K; w = Cols when Full.
// Both phases are this product: x against A (K = in), and v against B (K = the slot's rank).
template <int J, int Cols, bool Full, typename L, typename R>
inline void accumulate(const L* const* lhs, int64_t K, const R* rhs, int64_t ld, int w, float (&acc)[J][Cols]) {
  const int W = Full ? Cols : w;
  for (int64_t k = 0; k < K; ++k) {
    const R* rk = rhs + k * ld;
#pragma GCC unroll 4
    for (int j = 0; j < J; ++j) {
      const float l = static_cast<float>(lhs[j][k]);
#pragma omp simd
      for (int c = 0; c < W; ++c) acc[j][c] += l * static_cast<float>(rk[c]);
    }
  }
}

// out[j][0:w] = x[j] @ a[:, 0:w] for J tokens (a is K x lda, k-major).
template <int J, bool Full, typename T>
inline void shrink_block(const T* const* x, int64_t K, const T* a, int64_t lda, int w, float* const* out) {
  float acc[J][kColsShrink] = {};
  accumulate<J, kColsShrink, Full>(x, K, a, lda, w, acc);
  for (int j = 0; j < J; ++j)
    for (int c = 0; c < (Full ? kColsShrink : w); ++c) out[j][c] = acc[j][c];
}

// y[j][0:w] += round(v[j][0:rank] @ b[0:rank, 0:w]) for J tokens. The delta is summed in fp32 and
// rounded once into y, as the reference does.
template <int J, bool Full, typename T>
inline void expand_block(const float* const* v, int64_t rank, const T* b, int64_t ldb, int w, T* const* y) {
  float acc[J][kColsExpand] = {};
  accumulate<J, kColsExpand, Full>(v, rank, b, ldb, w, acc);
  for (int j = 0; j < J; ++j)
    for (int c = 0; c < (Full ? kColsExpand : w); ++c)
      y[j][c] = static_cast<T>(static_cast<float>(y[j][c]) + static_cast<float>(static_cast<T>(acc[j][c])));
}

// Calls f(J, Full) with J (1..kTokens) and Full as compile-time constants chosen at run time, so
// the blocks above are instantiated for each and the accumulators stay in registers.
template <typename F>
inline void with_block(int J, bool full, F&& f) {
  using std::integral_constant;
  switch (J * 2 + full) {
    case 9: f(integral_constant<int, 4>{}, std::true_type{}); break;
    case 8: f(integral_constant<int, 4>{}, std::false_type{}); break;
    case 7: f(integral_constant<int, 3>{}, std::true_type{}); break;
    case 6: f(integral_constant<int, 3>{}, std::false_type{}); break;
    case 5: f(integral_constant<int, 2>{}, std::true_type{}); break;
    case 4: f(integral_constant<int, 2>{}, std::false_type{}); break;
    case 3: f(integral_constant<int, 1>{}, std::true_type{}); break;
    default: f(integral_constant<int, 1>{}, std::false_type{}); break;
  }
}

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

  // The expand's tasks: column chunks of every slice, each for one slot.
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
  const int64_t chunks = static_cast<int64_t>(chunk_slice.size()), tasks = chunks * G;
  std::vector<int64_t> shrink_slot, shrink_j0;  // the shrink's tasks: (slot index, first token)
  for (int64_t g = 0; g < G; ++g)
    for (int64_t j = 0; j < counts[g]; j += kTaskTokens) {
      shrink_slot.push_back(g);
      shrink_j0.push_back(j);
    }
  const int64_t shrink_tasks = static_cast<int64_t>(shrink_slot.size());
  std::vector<float> v(TL * nR);
  float* vp = v.data();

  // One parallel region for both phases: waking torch's OpenMP workers costs more than a barrier,
  // and a decode step makes four of these calls per layer.
  const int threads = at::get_num_threads();
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    // Shrink: v[token, all slices] = x[token] @ A[slot], with every slice's A columns side by side
    // (the k-major layout), so one pass over A serves every slice.
#pragma omp for schedule(static)
    for (int64_t t = 0; t < shrink_tasks; ++t) {
      const int64_t g = shrink_slot[t], s = slots[g], start = starts[g], rank = ranks[g];
      const int64_t first = shrink_j0[t], last = std::min<int64_t>(counts[g], first + kTaskTokens);
      const T* as = ap + s * K * nR;
      for (int64_t j0 = first; j0 < last; j0 += kTokens) {
        const int J = static_cast<int>(std::min<int64_t>(kTokens, last - j0));
        const T* rows[kTokens];
        float* outs[kTokens];
        for (int64_t c0 = 0; c0 < nR; c0 += kColsShrink) {
          for (int j = 0; j < J; ++j) {
            rows[j] = xp + ids[start + j0 + j] * ldx;
            outs[j] = vp + (start + j0 + j) * nR + c0;
          }
          const int w = static_cast<int>(std::min<int64_t>(kColsShrink, nR - c0));
          with_block(J, w == kColsShrink, [&](auto j, auto full) {
            shrink_block<decltype(j)::value, decltype(full)::value, T>(rows, K, as + c0, nR, w, outs);
          });
        }
      }
      float* vt = vp + (start + first) * nR;
      const int64_t cnt = last - first;
      // A past a slot's real rank may hold anything: zero what it produced, the expand skips it.
      if (rank < R) {
        for (int64_t j = 0; j < cnt; ++j)
          for (int64_t i = 0; i < n; ++i)
            std::fill(vt + j * nR + i * R + rank, vt + j * nR + (i + 1) * R, 0.f);
      }
      if (scale != nullptr) {
        const float f = scale[s];
        for (int64_t e = 0; e < cnt * nR; ++e) vt[e] *= f;
      }
    }
    // (the implicit barrier of the loop above: every v row is complete)

    // Expand, one (slot, column chunk of a slice) per task, slot-major: a thread writes the rows of
    // the slots it shrank, which (the engine sorting each batch by slot) are about the half of y
    // that the same thread reads in the next elementwise op. Column-major order had every thread
    // write every row, and the next op then pulled half of y from the other core's cache.
#pragma omp for schedule(static)
    for (int64_t w = 0; w < tasks; ++w) {
      const int64_t g = w / chunks, ch = w % chunks;
      const int64_t i = chunk_slice[ch], c0 = chunk_c0[ch], c1 = chunk_c1[ch];
      const int64_t s = slots[g], start = starts[g], cnt = counts[g], rank = ranks[g];
      const T* b = b_data[i] + s * b_slot_stride[i];
      for (int64_t j0 = 0; j0 < cnt; j0 += kTokens) {
        const int J = static_cast<int>(std::min<int64_t>(kTokens, cnt - j0));
        const float* vrows[kTokens];
        T* yrows[kTokens];
        for (int64_t c = c0; c < c1; c += kColsExpand) {
          for (int j = 0; j < J; ++j) {
            vrows[j] = vp + (start + j0 + j) * nR + i * R;
            yrows[j] = yp + ids[start + j0 + j] * ldy + offsets[i] + c;
          }
          const int w = static_cast<int>(std::min<int64_t>(kColsExpand, c1 - c));
          with_block(J, w == kColsExpand, [&](auto j, auto full) {
            expand_block<decltype(j)::value, decltype(full)::value, T>(vrows, rank, b + c, b_rank_stride[i], w, yrows);
          });
        }
      }
    }
  }
}

void check(const at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const std::vector<at::Tensor>& bs,
           const at::Tensor& ids, const at::Tensor& slots, const at::Tensor& starts, const at::Tensor& counts,
           const at::Tensor& ranks, const c10::optional<at::Tensor>& scale) {
  TORCH_CHECK(!bs.empty(), "add_lora: no B slices");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && a.dim() == 3, "add_lora: x, y 2-D and A 3-D");
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu() && a.device().is_cpu(), "add_lora: CPU tensors");
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && a.scalar_type() == y.scalar_type(),
              "add_lora: x, y, A and B share one dtype");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1 && a.is_contiguous(), "add_lora: unit-stride rows, A contiguous");
  const int64_t T = y.size(0), S = a.size(0), K = a.size(1), nR = a.size(2), n = static_cast<int64_t>(bs.size());
  TORCH_CHECK(x.size(0) == T && x.size(1) == K && nR % n == 0, "add_lora: x [T, K], A [S, K, n * R]");
  int64_t width = 0;
  for (const at::Tensor& b : bs) {
    TORCH_CHECK(b.dim() == 3 && b.size(0) == S && b.size(2) == nR / n && b.stride(1) == 1 &&
                    b.scalar_type() == y.scalar_type() && b.device().is_cpu(),
                "add_lora: each B is [S, out_i, R] with out_i unit-stride");
    width += b.size(1);
  }
  TORCH_CHECK(width == y.size(1), "add_lora: y's width is the sum of the B slices'");
  for (const at::Tensor* t : {&slots, &starts, &counts, &ranks})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous() && t->device().is_cpu() &&
                    t->numel() == slots.numel(), "add_lora: slot tables are [A] int32 on CPU");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous() && ids.device().is_cpu(),
              "add_lora: token ids int64 on CPU");
  TORCH_CHECK(at::has_internal_overlap(y) != at::MemOverlap::Yes, "add_lora: y has rows that overlap");
  // Every token at most once, and the slots' runs tiling sorted_token_ids in order (as
  // LoraBatchMeta.build makes them): otherwise two threads could write one row of y.
  const int64_t TL = ids.numel();
  const int64_t* id = ids.data_ptr<int64_t>();
  std::vector<char> seen(T, 0);
  for (int64_t t = 0; t < TL; ++t) {
    TORCH_CHECK(id[t] >= 0 && id[t] < T, "add_lora: token id out of range");
    TORCH_CHECK(!seen[id[t]], "add_lora: a token id repeats");
    seen[id[t]] = 1;
  }
  int64_t next = 0;
  for (int64_t g = 0; g < slots.numel(); ++g) {
    const int64_t s = slots.data_ptr<int32_t>()[g], st = starts.data_ptr<int32_t>()[g];
    const int64_t c = counts.data_ptr<int32_t>()[g], r = ranks.data_ptr<int32_t>()[g];
    TORCH_CHECK(s >= 0 && s < S && st == next && c >= 0 && r >= 0 && r <= nR / n,
                "add_lora: slot table entry out of range, or the runs do not tile the token ids in order");
    next += c;
  }
  TORCH_CHECK(next == TL, "add_lora: the slots' token counts do not add up to the token ids");
  if (scale.has_value())
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->is_contiguous() && scale->numel() == S &&
                    scale->device().is_cpu(), "add_lora: scale is [S] float32 on CPU");
}

}  // namespace

void add_lora(at::Tensor y, at::Tensor x, at::Tensor a, std::vector<at::Tensor> bs, at::Tensor ids,
                 at::Tensor slots, at::Tensor starts, at::Tensor counts, at::Tensor ranks,
                 c10::optional<at::Tensor> scale) {
  check(y, x, a, bs, ids, slots, starts, counts, ranks, scale);
  const float* sp = scale.has_value() ? scale->data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "loraplane_add_lora", [&] {
    run<scalar_t>(y, x, a, bs, ids, slots, starts, counts, ranks, sp);
  });
}
