// Attention over packed documents for the CPU (XLA FFI custom calls, f32), forward and
// backward: kstore_jax/model/cpu_attention.py builds and registers this file.
//
// XLA:CPU runs the einsum path's batched dots and its soft-max on one thread (2-D matmuls use
// every core): at the `tiny` size attention was ~30% of a two-thread train step for ~10% of
// its FLOPs. Here each row of the batch (all its heads) is one work item on XLA's intra-op
// thread pool, and inside an item a block of query rows visits only the key columns its
// documents reach (causal: up to the block's last row), as small register-tiled matmuls.
//
// Layouts (row-major): q, k, v, o, do, dq, dk, dv [N, L, H, K] (N: every leading dimension
// together); seg [N, L] int32 (0: padding, which sees no key: output 0, gradient 0); lse
// [N, H, L] (each query row's log-sum-exp of its scaled scores, for the backward pass).
// A query sees a key of its own segment id (> 0), and, causal, at a column <= its own.
// Every item is computed by one thread in a fixed order: results do not depend on threads.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// A Vec is one of the machine's vector registers, at most 256 bits (a GCC vector: 64-byte
// vectors on an AVX2 machine were split into halves the compiler handled through memory,
// 10-20x slower; on the AVX-512 Zen 4, 256-bit tiles 16 columns wide ran faster than 512-bit
// ones 32 wide, whose rows pad further past a block's keys)
#if defined(__AVX__)
constexpr int64_t VW = 8;    // floats in a Vec
#else
constexpr int64_t VW = 4;    // SSE, NEON
#endif
typedef float Vec __attribute__((vector_size(4 * VW)));
constexpr int64_t MR = 4;         // rows of a register tile
constexpr int64_t NV = 2;         // Vecs across a tile: MR x NV accumulators in registers
constexpr int64_t NR = NV * VW;   // columns of a register tile
constexpr int64_t RB = 16;        // query rows of a block (a multiple of MR)

int64_t up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}
inline void store(float* p, Vec v) { std::memcpy(p, &v, sizeof(Vec)); }

// C[m, n] (+)= A[m, kd] . B[kd, n]: row-major with leading dims (TransA: A given as its
// transpose, [kd, m]: its elements are broadcast one at a time either way, so no copy is
// needed); m a multiple of MR and n of NR (callers pad their buffers so whole tiles may be
// read and written). The tile's accumulators stay in registers.

template <bool TransA = false>
void gemm(int64_t m, int64_t n, int64_t kd, const float* A, int64_t lda, const float* B,
          int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < m; i += MR) {
    for (int64_t j = 0; j < n; j += NR) {
      Vec acc[MR][NV];
      for (int64_t r = 0; r < MR; ++r)
        for (int64_t c = 0; c < NV; ++c)
          acc[r][c] = accumulate ? load(C + (i + r) * ldc + j + c * VW) : Vec{};
      for (int64_t p = 0; p < kd; ++p) {
        Vec b[NV];
        for (int64_t c = 0; c < NV; ++c) b[c] = load(B + p * ldb + j + c * VW);
        for (int64_t r = 0; r < MR; ++r) {
          const float ar = TransA ? A[p * lda + i + r] : A[(i + r) * lda + p];
          for (int64_t c = 0; c < NV; ++c) acc[r][c] += ar * b[c];
        }
      }
      for (int64_t r = 0; r < MR; ++r)
        for (int64_t c = 0; c < NV; ++c) store(C + (i + r) * ldc + j + c * VW, acc[r][c]);
    }
  }
}

// sum and maximum of x[0, n), n a multiple of VW, as VW lanes then across them: vectorised
// (a float loop's reduction is not, without reassociation) and in a fixed order
float lanes_sum(Vec v) {
  float total = 0.f;
  for (int64_t c = 0; c < VW; ++c) total += v[c];
  return total;
}

float sum(const float* x, int64_t n) {
  Vec acc{};
  for (int64_t j = 0; j < n; j += VW) acc += load(x + j);
  return lanes_sum(acc);
}

float maximum(const float* x, int64_t n) {
  Vec acc = load(x);
  for (int64_t j = VW; j < n; j += VW) {
    const Vec v = load(x + j);
    acc = acc > v ? acc : v;
  }
  float top = acc[0];
  for (int64_t c = 1; c < VW; ++c) top = std::max(top, acc[c]);
  return top;
}

float dot(const float* x, const float* y, int64_t n) {
  Vec acc{};
  for (int64_t j = 0; j < n; j += VW) acc += load(x + j) * load(y + j);
  return lanes_sum(acc);
}

// exp(x) for x <= 0 (scores minus their row's maximum or log-sum-exp), branch-free so that
// loops over it vectorise (libm's expf is a call a value): 2^n exp(r), n = round(x / ln 2)
// (by the 1.5 * 2^23 rounding trick), r = x - n ln 2 in two parts (|r| <= ln(2) / 2), exp(r)
// by its degree-6 Taylor polynomial (relative error ~2e-7); 0 below -87, where expf underflows.
inline float exp_nonpos(float x) {
  const float xc = std::max(x, -87.f);
  const float n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  return x < -87.f ? 0.f : p * two_n;
}

// dst[c, r] = src[r, c] for r < rows, c < cols (leading dims given)
void transpose(int64_t rows, int64_t cols, const float* src, int64_t lds, float* dst,
               int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
}

struct Shape {
  int64_t N, L, H, K;
  int64_t Kp() const { return up(K, NR); }
  int64_t Lp() const { return up(L, NR) + NR; }   // room for a tile read past a range's end
};

// Which keys each query row sees: [lo, hi] (inclusive; hi < lo: none), and its segment id.
struct Rows {
  std::vector<int64_t> lo, hi, first, last;
  std::vector<int32_t> seg;   // the row's segment ids, -1 past its end (a tile reads there)
  void build(const int32_t* seg_L, int64_t L, int64_t Lp, bool causal) {
    seg.assign(Lp, -1);
    std::copy(seg_L, seg_L + L, seg.begin());
    lo.assign(L, 0);
    hi.assign(L, -1);
    first.assign(L + 1, L);   // by segment id (clipped to L)
    last.assign(L + 1, -1);
    for (int64_t j = 0; j < L; ++j) {
      int64_t s = std::clamp<int64_t>(seg_L[j], 0, L);
      first[s] = std::min(first[s], j);
      last[s] = std::max(last[s], j);
    }
    for (int64_t i = 0; i < L; ++i) {
      if (seg_L[i] <= 0) continue;
      int64_t s = std::clamp<int64_t>(seg_L[i], 0, L);
      lo[i] = first[s];
      hi[i] = causal ? i : last[s];
    }
  }
  // p[j] = f(s[j]) where query row i sees key column clo + j, else `unseen`, for j < wp
  template <typename F>
  void where_seen(int64_t i, int64_t clo, int64_t wp, const float* s, float* p, F f,
                  float unseen = 0.f) const {
    const int64_t l = lo[i] - clo, h = hi[i] - clo;
    const int32_t si = seg[i];
    const int32_t* sj = seg.data() + clo;
    for (int64_t j = 0; j < wp; ++j) {
      const float y = f(s[j]);
      p[j] = (j >= l && j <= h && sj[j] == si) ? y : unseen;
    }
  }
  // whether query row i (of a block ending before r1) sees any key
  bool sees_any(int64_t i, int64_t r1) const { return i < r1 && hi[i] >= lo[i]; }
  // the columns a block of rows [r0, r1) reaches: [clo, chi] (chi < clo: none)
  void block(int64_t r0, int64_t r1, int64_t* clo, int64_t* chi) const {
    *clo = INT64_MAX;
    *chi = -1;
    for (int64_t i = r0; i < r1; ++i)
      if (hi[i] >= lo[i]) {
        *clo = std::min(*clo, lo[i]);
        *chi = std::max(*chi, hi[i]);
      }
  }
};

// The [L, K] matrix of head h of row n of a [N, L, H, K] array, into a zero-padded
// [*, ld] buffer (times `scale`).
void gather(const float* x, const Shape& s, int64_t n, int64_t h, float scale, float* dst,
            int64_t ld) {
  for (int64_t l = 0; l < s.L; ++l) {
    const float* src = x + ((n * s.L + l) * s.H + h) * s.K;
    for (int64_t c = 0; c < s.K; ++c) dst[l * ld + c] = src[c] * scale;
  }
}

void scatter(const float* src, int64_t ld, const Shape& s, int64_t n, int64_t h, float scale,
             float* x) {
  for (int64_t l = 0; l < s.L; ++l) {
    float* dst = x + ((n * s.L + l) * s.H + h) * s.K;
    for (int64_t c = 0; c < s.K; ++c) dst[c] = src[l * ld + c] * scale;
  }
}

// Runs item(i, worker scratch) for i in [0, count) on the caller and the pool's threads.
// Tasks hold the shared state, so one that starts after the work is done touches nothing
// freed; the caller returns when every item has been computed.
template <typename Scratch, typename Item>
void parallel_items(ffi::ThreadPool& pool, int64_t count, Item item) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto work = [state, count, item]() {
    Scratch scratch;
    int64_t i, finished = 0;
    while ((i = state->next.fetch_add(1)) < count) {
      item(i, scratch);
      ++finished;
    }
    if (finished && state->done.fetch_add(finished) + finished == count) {
      std::lock_guard<std::mutex> lock(state->mu);
      state->cv.notify_all();
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), count - 1);
  for (int64_t t = 0; t < helpers; ++t) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == count; });
}

struct Scratch {
  std::vector<float> q, kt, kr, v, vt, o, d, s, p, t, dq, dk, dv;
  Rows rows;
};

// The item's q (scaled), k, k^T, v (and v^T) as zero-padded contiguous matrices; buffers
// are allocated (zeroed) at a worker's first item, and later items overwrite only the
// unpadded parts, so the padding stays zero.
void prepare(Scratch& x, const Shape& sh, const float* q, const float* k, const float* v,
             int64_t n, int64_t h, bool need_vt) {
  const int64_t Kp = sh.Kp(), Lp = sh.Lp();
  const float scale = 1.0f / std::sqrt(static_cast<float>(sh.K));
  if (x.q.empty()) {
    for (auto* b : {&x.q, &x.kr, &x.v, &x.o, &x.d, &x.dq, &x.dk, &x.dv}) b->assign(Lp * Kp, 0.f);
    for (auto* b : {&x.kt, &x.vt}) b->assign(Kp * Lp, 0.f);
    for (auto* b : {&x.s, &x.p, &x.t}) b->assign(RB * Lp, 0.f);
  }
  gather(q, sh, n, h, scale, x.q.data(), Kp);
  gather(k, sh, n, h, 1.f, x.kr.data(), Kp);
  gather(v, sh, n, h, 1.f, x.v.data(), Kp);
  transpose(sh.L, Kp, x.kr.data(), Kp, x.kt.data(), Lp);
  if (need_vt) transpose(sh.L, Kp, x.v.data(), Kp, x.vt.data(), Lp);
}

// The leading dims together, L, H, K of a [..., L, H, K] buffer
Shape shape_of(ffi::Span<const int64_t> dims) {
  Shape sh{1, dims[dims.size() - 3], dims[dims.size() - 2], dims[dims.size() - 1]};
  for (size_t i = 0; i + 3 < dims.size(); ++i) sh.N *= dims[i];
  return sh;
}

// For each block of RB query rows [r0, r1) of head h: empty(r0, r1) where none of its
// queries sees a key, else block(r0, r1, clo, wp) with the block's scores against its key
// columns [clo, clo + wp) in x.s, (q scaled) . k^T (wp: their count padded to whole tiles).
template <typename Empty, typename Block>
void walk_blocks(Scratch& x, const Shape& sh, Empty empty, Block block) {
  for (int64_t r0 = 0; r0 < sh.L; r0 += RB) {
    const int64_t r1 = std::min(r0 + RB, sh.L);
    int64_t clo, chi;
    x.rows.block(r0, r1, &clo, &chi);
    if (chi < clo) {
      empty(r0, r1);
      continue;
    }
    const int64_t wp = up(chi - clo + 1, NR);
    gemm(RB, wp, sh.Kp(), x.q.data() + r0 * sh.Kp(), sh.Kp(), x.kt.data() + clo, sh.Lp(),
         x.s.data(), sh.Lp(), false);
    block(r0, r1, clo, wp);
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg, int32_t causal,
                   ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse) {
  if (q.dimensions().size() < 3) return ffi::Error::InvalidArgument("q must be [..., L, H, K]");
  const Shape sh = shape_of(q.dimensions());
  const float *qd = q.typed_data(), *kd = k.typed_data(), *vd = v.typed_data();
  const int32_t* sd = seg.typed_data();
  float *od = o->typed_data(), *ld = lse->typed_data();
  parallel_items<Scratch>(pool, sh.N, [=](int64_t n, Scratch& x) {
    const int64_t L = sh.L, Kp = sh.Kp(), Lp = sh.Lp();
    x.rows.build(sd + n * L, L, Lp, causal);
    for (int64_t h = 0; h < sh.H; ++h) {
      prepare(x, sh, qd, kd, vd, n, h, false);
      float* lse_L = ld + (n * sh.H + h) * L;
      std::fill(lse_L, lse_L + L, 0.f);
      auto empty = [&](int64_t r0, int64_t r1) {   // no query sees a key: zero outputs
        std::fill(x.o.data() + r0 * Kp, x.o.data() + r1 * Kp, 0.f);
      };
      walk_blocks(x, sh, empty, [&](int64_t r0, int64_t r1, int64_t clo, int64_t wp) {
        for (int64_t i = r0; i < r0 + RB; ++i) {
          float* s = x.s.data() + (i - r0) * Lp;
          float* e = x.p.data() + (i - r0) * Lp;   // -> probabilities
          if (!x.rows.sees_any(i, r1)) {
            std::fill(e, e + wp, 0.f);
            continue;
          }
          x.rows.where_seen(i, clo, wp, s, e, [](float y) { return y; }, -INFINITY);
          const float top = maximum(e, wp);   // the largest score the row sees
          x.rows.where_seen(i, clo, wp, s, e, [top](float y) { return exp_nonpos(y - top); });
          const float total = sum(e, wp), inv = 1.f / total;
          for (int64_t j = 0; j < wp; ++j) e[j] *= inv;
          lse_L[i] = top + std::log(total);
        }
        gemm(RB, Kp, wp, x.p.data(), Lp, x.v.data() + clo * Kp, Kp, x.o.data() + r0 * Kp, Kp,
             false);
      });
      scatter(x.o.data(), Kp, sh, n, h, 1.f, od);
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg,
                    ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<ffi::F32> dout, int32_t causal,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv) {
  if (q.dimensions().size() < 3) return ffi::Error::InvalidArgument("q must be [..., L, H, K]");
  const Shape sh = shape_of(q.dimensions());
  const float *qd = q.typed_data(), *kd = k.typed_data(), *vd = v.typed_data();
  const float *odata = o.typed_data(), *ld = lse.typed_data(), *dod = dout.typed_data();
  const int32_t* sd = seg.typed_data();
  float *dqd = dq->typed_data(), *dkd = dk->typed_data(), *dvd = dv->typed_data();
  parallel_items<Scratch>(pool, sh.N, [=](int64_t n, Scratch& x) {
    const int64_t L = sh.L, Kp = sh.Kp(), Lp = sh.Lp();
    const float scale = 1.0f / std::sqrt(static_cast<float>(sh.K));
    x.rows.build(sd + n * L, L, Lp, causal);
    for (int64_t h = 0; h < sh.H; ++h) {
      prepare(x, sh, qd, kd, vd, n, h, true);
      gather(dod, sh, n, h, 1.f, x.d.data(), Kp);
      gather(odata, sh, n, h, 1.f, x.o.data(), Kp);
      std::fill(x.dk.begin(), x.dk.end(), 0.f);
      std::fill(x.dv.begin(), x.dv.end(), 0.f);
      const float* lse_L = ld + (n * sh.H + h) * L;
      auto empty = [&](int64_t r0, int64_t r1) {
        std::fill(x.dq.data() + r0 * Kp, x.dq.data() + r1 * Kp, 0.f);
      };
      walk_blocks(x, sh, empty, [&](int64_t r0, int64_t r1, int64_t clo, int64_t wp) {
        gemm(RB, wp, Kp, x.d.data() + r0 * Kp, Kp, x.vt.data() + clo, Lp, x.t.data(), Lp,
             false);                                                     // t: d out . v^T
        for (int64_t i = r0; i < r0 + RB; ++i) {
          float* s = x.s.data() + (i - r0) * Lp;   // scores -> probabilities p
          float* g = x.p.data() + (i - r0) * Lp;   // -> score gradients p (t - delta)
          const float* t = x.t.data() + (i - r0) * Lp;
          if (!x.rows.sees_any(i, r1)) {
            std::fill(s, s + wp, 0.f);
            std::fill(g, g + wp, 0.f);
            continue;
          }
          // sum over k of d out * out: the row's sum of p * (d out . v)
          const float delta = dot(x.d.data() + i * Kp, x.o.data() + i * Kp, Kp);
          const float top = lse_L[i];
          x.rows.where_seen(i, clo, wp, s, s, [top](float y) { return exp_nonpos(y - top); });
          for (int64_t j = 0; j < wp; ++j) g[j] = s[j] * (t[j] - delta);
        }
        // dq rows = ds . k ; dk, dv columns += ds^T . q, p^T . d out
        gemm(RB, Kp, wp, x.p.data(), Lp, x.kr.data() + clo * Kp, Kp, x.dq.data() + r0 * Kp,
             Kp, false);
        gemm<true>(wp, Kp, RB, x.p.data(), Lp, x.q.data() + r0 * Kp, Kp,
                   x.dk.data() + clo * Kp, Kp, true);
        gemm<true>(wp, Kp, RB, x.s.data(), Lp, x.d.data() + r0 * Kp, Kp,
                   x.dv.data() + clo * Kp, Kp, true);
      });
      scatter(x.dq.data(), Kp, sh, n, h, scale, dqd);
      scatter(x.dk.data(), Kp, sh, n, h, 1.f, dkd);   // (q was scaled: ds^T . (scale q))
      scatter(x.dv.data(), Kp, sh, n, h, 1.f, dvd);
    }
  });
  return ffi::Error::Success();
}

// The arguments both handlers begin with: the thread pool, then q, k, v and seg
auto bind_attention_inputs() {
  using F32 = ffi::Buffer<ffi::F32>;
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<
      ffi::Buffer<ffi::S32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KstoreAttentionForward, Forward,
                              bind_attention_inputs()
                                  .Attr<int32_t>("causal")
                                  .Ret<ffi::Buffer<ffi::F32>>()     // out
                                  .Ret<ffi::Buffer<ffi::F32>>());   // lse

XLA_FFI_DEFINE_HANDLER_SYMBOL(KstoreAttentionBackward, Backward,
                              bind_attention_inputs()
                                  .Arg<ffi::Buffer<ffi::F32>>()     // out
                                  .Arg<ffi::Buffer<ffi::F32>>()     // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()     // d out
                                  .Attr<int32_t>("causal")
                                  .Ret<ffi::Buffer<ffi::F32>>()     // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()     // dk
                                  .Ret<ffi::Buffer<ffi::F32>>());   // dv
