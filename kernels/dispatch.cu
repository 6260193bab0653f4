// kernels/dispatch.cu -- the last chapter of the course: expert dispatch as four small CUDA kernels.
//
// moe.dispatch_sorted does, in PyTorch: sort the N*k (token, slot) assignments by expert, gather the token rows
// into expert-contiguous order, run the experts as one grouped matmul, and take each token's gate-weighted sum
// of its k output rows. The PyTorch version waits for the GPU once (to size the sorted buffer) and moves its
// data through several generic kernels (argsort, bincount, index_select, index_copy, a broadcast multiply,
// a sum). Here the same work is:
//
//   build_index   per-expert counts, offsets and a stable slot for every assignment, on the device
//   permute       gather each kept assignment's token row into its slot         (read <= k*N*H, write k*N*H)
//   combine       per token, the gate-weighted sum of its k rows, in one pass   (read k*N*H,  write N*H)
//   combine_grad  the backward of combine: rows and gate weights
//
// Layout and sizes. Assignment a = token * k + slot. The sorted buffer always has M = N*k rows, so its size
// never depends on the routing and nothing waits for the GPU: kept assignments fill rows [0, kept) grouped by
// expert in token order (the order a stable sort gives, as in dispatch_sorted); the rows [kept, M) that
// dropped assignments would have used are zero and belong to no assignment (src = -1). Python counts those
// tail rows into the last expert's group, where zero rows have zero gradient, so the grouped matmul needs no
// host-side size either.
//
// Determinism: no floating-point atomics anywhere. Each output element is written by exactly one thread, and
// every sum is taken in a fixed order, so the results are bitwise reproducible run to run.
//
// Vectorisation: a row of H elements is moved in 16-byte packs (8 bf16/fp16 or 4 fp32 values) when H and the
// pointers allow it; that is what lets a copy-like kernel approach the memory bandwidth. Arithmetic is in fp32.

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <torch/extension.h>

#include <limits>
#include <type_traits>

namespace {

constexpr int kIndexThreads = 256;  // threads per block of the index kernels
constexpr int kIndexItems = 8;      // consecutive assignments per thread per step: 2048 per block step
constexpr int kRowThreads = 128;    // threads per row of the row kernels

// ---------------------------------------------------------------------------------------------------------
// 16-byte packs

template <typename T>
struct Pack {
  static constexpr int N = 16 / sizeof(T);  // elements per 16-byte pack
};

template <typename T>
__device__ __forceinline__ void load_pack(const T* p, float* f) {
  uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < Pack<T>::N; ++i) f[i] = static_cast<float>(v[i]);
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const float* f) {
  uint4 raw;
  T* v = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < Pack<T>::N; ++i) v[i] = static_cast<T>(f[i]);
  *reinterpret_cast<uint4*>(p) = raw;
}

// ---------------------------------------------------------------------------------------------------------
// build_index, part 1: how many kept assignments each expert has.
//
// Grid: one block per expert. Block e reads all N*k expert ids and keep flags (5 bytes each) and counts its
// own; a block reduction, no atomics. E passes over N*k small integers (5 MB for N = 64k, k = 2, E = 8, mostly
// from L2), small next to the hundreds of MB the row kernels move.

__global__ void count_kernel(const int32_t* __restrict__ expert, const bool* __restrict__ keep, int64_t n_assign,
                             int32_t* __restrict__ counts) {
  using BlockReduce = cub::BlockReduce<int, kIndexThreads>;
  __shared__ typename BlockReduce::TempStorage tmp;
  const int e = blockIdx.x;
  int mine = 0;
  for (int64_t a = threadIdx.x; a < n_assign; a += blockDim.x) mine += (expert[a] == e) & keep[a];
  const int total = BlockReduce(tmp).Sum(mine);
  if (threadIdx.x == 0) counts[e] = total;
}

// build_index, part 2: a stable slot for every kept assignment.
//
// Block e starts at offset_e = counts[0] + ... + counts[e-1] and walks the assignments in order, 2048 at a
// time (8 consecutive ones per thread, the "blocked" arrangement CUB's scan expects); an exclusive block scan
// of "is mine" gives each of its assignments its rank among the earlier ones, so the slot is offset_e + rank:
// expert-major, assignment order within an expert -- a stable sort by expert, without sorting. It writes
// dest[a] = slot and the inverse map src[slot] = a (both arrive filled with -1: dropped / unused).

__global__ void slot_kernel(const int32_t* __restrict__ expert, const bool* __restrict__ keep, int64_t n_assign,
                            const int32_t* __restrict__ counts, int32_t* __restrict__ dest,
                            int32_t* __restrict__ src) {
  using BlockScan = cub::BlockScan<int, kIndexThreads>;
  __shared__ typename BlockScan::TempStorage tmp;
  __shared__ int running;  // this expert's assignments seen in earlier steps
  const int e = blockIdx.x;
  if (threadIdx.x == 0) {
    int offset = 0;
    for (int i = 0; i < e; ++i) offset += counts[i];
    running = offset;
  }
  __syncthreads();
  for (int64_t base = 0; base < n_assign; base += kIndexThreads * kIndexItems) {
    const int64_t first = base + static_cast<int64_t>(threadIdx.x) * kIndexItems;
    int mine[kIndexItems], rank[kIndexItems], step_total;
#pragma unroll
    for (int i = 0; i < kIndexItems; ++i) {
      const int64_t a = first + i;
      mine[i] = a < n_assign ? ((expert[a] == e) & keep[a]) : 0;
    }
    BlockScan(tmp).ExclusiveSum(mine, rank, step_total);
#pragma unroll
    for (int i = 0; i < kIndexItems; ++i) {
      if (mine[i]) {
        const int slot = running + rank[i];
        dest[first + i] = slot;
        src[slot] = static_cast<int32_t>(first + i);
      }
    }
    __syncthreads();  // everyone has read `running` and the scan storage before they change
    if (threadIdx.x == 0) running += step_total;
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------------------
// permute: x_sorted[r] = x[src[r] / k], or zeros for a tail row.
//
// One block per destination row: it reads one contiguous token row and writes one contiguous row, both in
// 16-byte packs. Traffic: read kept*H + write M*H elements (a token row read k times mostly hits L2).
// Indexing by destination (a gather) rather than by token (a scatter) makes every write coalesced and gives
// the tail rows their zeros for free.

template <typename T, bool kVec>
__global__ void permute_kernel(const T* __restrict__ x, const int32_t* __restrict__ src, int k, int64_t H,
                               T* __restrict__ out) {
  const int64_t r = blockIdx.x;
  const int32_t a = src[r];
  T* row = out + r * H;
  if (kVec) {  // a plain 16-byte copy: exact for any dtype
    constexpr int N = Pack<T>::N;
    for (int64_t h = threadIdx.x * N; h < H; h += blockDim.x * N)
      *reinterpret_cast<uint4*>(row + h) =
          a >= 0 ? *reinterpret_cast<const uint4*>(x + (a / k) * H + h) : make_uint4(0, 0, 0, 0);
  } else {
    for (int64_t h = threadIdx.x; h < H; h += blockDim.x) row[h] = a >= 0 ? x[(a / k) * H + h] : T(0.f);
  }
}

// ---------------------------------------------------------------------------------------------------------
// combine: out[t] = sum over slots s of w[t, s] * rows[dest[t, s]]   (w = 1 when weights is null)
//
// One block per token: k row reads, one row write, the k-term sum in fp32 in slot order (deterministic, no
// atomics). Traffic: read k*N*H, write N*H elements. With w = null this is also permute's backward: a token's
// gradient is the unweighted sum of its k rows' gradients.

template <typename T, typename Out, bool kVec>
__global__ void combine_kernel(const T* __restrict__ rows, const float* __restrict__ w,
                               const int32_t* __restrict__ dest, int k, int64_t H, Out* __restrict__ out) {
  const int64_t t = blockIdx.x;
  if (kVec) {
    constexpr int N = Pack<T>::N;  // Out packs are handled element by element below
    float acc[N], f[N];
    for (int64_t h = threadIdx.x * N; h < H; h += blockDim.x * N) {
#pragma unroll
      for (int i = 0; i < N; ++i) acc[i] = 0.f;
      for (int s = 0; s < k; ++s) {
        const int32_t r = dest[t * k + s];
        if (r < 0) continue;  // a dropped assignment contributes nothing
        const float ws = w ? w[t * k + s] : 1.f;
        load_pack(rows + r * H + h, f);
#pragma unroll
        for (int i = 0; i < N; ++i) acc[i] += ws * f[i];
      }
      if constexpr (std::is_same<Out, float>::value) {  // fp32 out: 16-byte stores too
#pragma unroll
        for (int i = 0; i < N; i += 4)
          *reinterpret_cast<float4*>(out + t * H + h + i) = make_float4(acc[i], acc[i + 1], acc[i + 2], acc[i + 3]);
      } else {
        store_pack(out + t * H + h, acc);
      }
    }
  } else {
    for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
      float acc = 0.f;
      for (int s = 0; s < k; ++s) {
        const int32_t r = dest[t * k + s];
        if (r >= 0) acc += (w ? w[t * k + s] : 1.f) * static_cast<float>(rows[r * H + h]);
      }
      out[t * H + h] = static_cast<Out>(acc);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// combine's backward, rows: d_rows[r] = w[a] * dy[a / k] for a = src[r], zeros for a tail row.
//
// The same gather-by-destination shape as permute (and, like it, no atomics): read kept*H, write M*H.

template <typename G, typename T>
__global__ void combine_grad_rows_kernel(const G* __restrict__ dy, const float* __restrict__ w,
                                         const int32_t* __restrict__ src, int k, int64_t H, T* __restrict__ d_rows) {
  const int64_t r = blockIdx.x;
  const int32_t a = src[r];
  const float wa = a >= 0 ? w[a] : 0.f;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x)
    d_rows[r * H + h] = static_cast<T>(a >= 0 ? wa * static_cast<float>(dy[(a / k) * H + h]) : 0.f);
}

// combine's backward, gate weights: dw[a] = <dy[a / k], rows[dest[a]]>, 0 for a dropped assignment.
//
// One warp per assignment: a strided dot product over H, then a shuffle reduction in a fixed tree (so the
// same inputs give the same bits). Reads 2*k*N*H, writes k*N floats; rows is the forward's saved output.

template <typename G, typename T>
__global__ void combine_grad_weights_kernel(const G* __restrict__ dy, const T* __restrict__ rows,
                                            const int32_t* __restrict__ dest, int k, int64_t n_assign, int64_t H,
                                            float* __restrict__ dw) {
  const int64_t a = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (a >= n_assign) return;
  const int32_t r = dest[a];
  float sum = 0.f;
  if (r >= 0) {
    for (int64_t h = lane; h < H; h += 32)
      sum += static_cast<float>(dy[(a / k) * H + h]) * static_cast<float>(rows[r * H + h]);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffff, sum, offset);
  if (lane == 0) dw[a] = sum;
}

bool packs_fit(int64_t H, size_t elem, std::initializer_list<const void*> ptrs) {
  if ((H * elem) % 16 != 0) return false;
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

void check_cuda(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// Host functions (bound to Python in dispatch.cpp)

std::vector<torch::Tensor> build_index(torch::Tensor expert_index, torch::Tensor keep, int64_t num_experts) {
  check_cuda(expert_index, "expert_index");
  check_cuda(keep, "keep");
  TORCH_CHECK(expert_index.dim() == 2 && keep.sizes() == expert_index.sizes(), "expert_index and keep: (N, k)");
  TORCH_CHECK(keep.scalar_type() == torch::kBool, "keep must be bool");
  const c10::cuda::CUDAGuard guard(expert_index.device());
  auto expert = expert_index.to(torch::kInt32).contiguous();
  const int64_t n_assign = expert.numel();
  TORCH_CHECK(n_assign <= std::numeric_limits<int32_t>::max(), "build_index: more than 2^31 assignments");
  auto opts = expert.options();
  auto counts = torch::empty({num_experts}, opts);
  auto dest = torch::full_like(expert, -1);
  auto src = torch::full({n_assign}, -1, opts);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (n_assign > 0) {
    count_kernel<<<num_experts, kIndexThreads, 0, stream>>>(expert.data_ptr<int32_t>(), keep.data_ptr<bool>(),
                                                              n_assign, counts.data_ptr<int32_t>());
    slot_kernel<<<num_experts, kIndexThreads, 0, stream>>>(expert.data_ptr<int32_t>(), keep.data_ptr<bool>(),
                                                             n_assign, counts.data_ptr<int32_t>(),
                                                             dest.data_ptr<int32_t>(), src.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    counts.zero_();
  }
  return {dest, src, counts};
}

torch::Tensor permute(torch::Tensor x, torch::Tensor src, int64_t k) {
  check_cuda(x, "x");
  check_cuda(src, "src");
  TORCH_CHECK(x.dim() == 2 && src.scalar_type() == torch::kInt32, "permute: x (N, H), src int32 (N*k)");
  TORCH_CHECK(x.scalar_type() != torch::kDouble && x.device() == src.device(), "permute: fp32/fp16/bf16, one device");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t H = x.size(1), M = src.numel();
  auto out = torch::empty({M, H}, x.options());
  if (M == 0 || H == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "permute", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    if (packs_fit(H, sizeof(scalar_t), {xp, op}))
      permute_kernel<scalar_t, true><<<M, kRowThreads, 0, stream>>>(xp, src.data_ptr<int32_t>(), k, H, op);
    else
      permute_kernel<scalar_t, false><<<M, kRowThreads, 0, stream>>>(xp, src.data_ptr<int32_t>(), k, H, op);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// weights (N, k) fp32 or undefined (unweighted: permute's backward). The output is fp32 when weighted (as
// dispatch_sorted's, whose fp32 gates promote the sum) and rows' dtype when not.
torch::Tensor combine(torch::Tensor rows, c10::optional<torch::Tensor> weights, torch::Tensor dest) {
  check_cuda(rows, "rows");
  check_cuda(dest, "dest");
  TORCH_CHECK(rows.dim() == 2 && dest.dim() == 2 && dest.scalar_type() == torch::kInt32,
              "combine: rows (M, H), dest int32 (N, k)");
  TORCH_CHECK(rows.scalar_type() != torch::kDouble && rows.device() == dest.device(), "combine: fp32/fp16/bf16");
  const bool weighted = weights.has_value() && weights->defined();
  if (weighted) {
    check_cuda(*weights, "weights");
    TORCH_CHECK(weights->scalar_type() == torch::kFloat32 && weights->sizes() == dest.sizes(),
                "combine: weights must be fp32 (N, k)");
  }
  const c10::cuda::CUDAGuard guard(rows.device());
  const int64_t N = dest.size(0), k = dest.size(1), H = rows.size(1);
  auto out = torch::empty({N, H}, rows.options().dtype(weighted ? torch::kFloat32 : rows.scalar_type()));
  if (N == 0 || H == 0) return out;
  const float* wp = weighted ? weights->data_ptr<float>() : nullptr;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "combine", [&] {
    const scalar_t* rp = rows.data_ptr<scalar_t>();
    const bool vec = packs_fit(H, sizeof(scalar_t), {rp});
    const int32_t* dp = dest.data_ptr<int32_t>();
    if (weighted) {
      float* op = out.data_ptr<float>();
      if (vec)
        combine_kernel<scalar_t, float, true><<<N, kRowThreads, 0, stream>>>(rp, wp, dp, k, H, op);
      else
        combine_kernel<scalar_t, float, false><<<N, kRowThreads, 0, stream>>>(rp, wp, dp, k, H, op);
    } else {
      scalar_t* op = out.data_ptr<scalar_t>();
      if (vec)
        combine_kernel<scalar_t, scalar_t, true><<<N, kRowThreads, 0, stream>>>(rp, wp, dp, k, H, op);
      else
        combine_kernel<scalar_t, scalar_t, false><<<N, kRowThreads, 0, stream>>>(rp, wp, dp, k, H, op);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// The backward of the weighted combine: (d_rows (M, H) in rows' dtype, d_weights (N, k) fp32).
std::vector<torch::Tensor> combine_backward(torch::Tensor dy, torch::Tensor rows, torch::Tensor weights,
                                            torch::Tensor dest, torch::Tensor src) {
  for (auto* t : {&dy, &rows, &weights, &dest, &src}) {
    check_cuda(*t, "combine_backward input");
    TORCH_CHECK(t->device() == dy.device(), "combine_backward: all inputs on one device");
  }
  const c10::cuda::CUDAGuard guard(dy.device());
  const int64_t N = dest.size(0), k = dest.size(1), H = rows.size(1), M = rows.size(0);
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == N && dy.size(1) == H, "combine_backward: dy must be (N, H)");
  TORCH_CHECK(weights.scalar_type() == torch::kFloat32 && weights.sizes() == dest.sizes(),
              "combine_backward: weights must be fp32 (N, k)");
  TORCH_CHECK(dest.scalar_type() == torch::kInt32 && src.scalar_type() == torch::kInt32 && src.numel() == M,
              "combine_backward: dest (N, k) and src (M) int32");
  TORCH_CHECK(rows.scalar_type() != torch::kDouble && dy.scalar_type() != torch::kDouble,
              "combine_backward: fp32/fp16/bf16");
  auto d_rows = torch::empty_like(rows);
  auto d_weights = torch::empty({N, k}, weights.options());
  if (N == 0 || H == 0) return {d_rows.zero_(), d_weights.zero_()};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "combine_backward", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "combine_backward_dy", [&] {
      using G = scalar_t;
      combine_grad_rows_kernel<G, T><<<M, kRowThreads, 0, stream>>>(
          dy.data_ptr<G>(), weights.data_ptr<float>(), src.data_ptr<int32_t>(), k, H, d_rows.data_ptr<T>());
      const int64_t threads = 256, warps_per_block = threads / 32;
      const int64_t blocks = (N * k + warps_per_block - 1) / warps_per_block;
      combine_grad_weights_kernel<G, T><<<blocks, threads, 0, stream>>>(
          dy.data_ptr<G>(), rows.data_ptr<T>(), dest.data_ptr<int32_t>(), k, N * k, H, d_weights.data_ptr<float>());
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {d_rows, d_weights};
}
