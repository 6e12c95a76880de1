// bf16 x bf16 matrix products through oneDNN, as XLA FFI handlers (optional CPU path of emajax.native).
//
// out[M, N] = op(a) @ op(b) with fp32 accumulation, op = identity or transpose of a row-major operand;
// the result is fp32 or bf16 (rounded once). oneDNN picks the AMX / AVX512-BF16 kernel for this CPU.
// Primitives are created once per (shape, transposes, out type) and reused; oneDNN runs them on its
// OpenMP threads.
#include <cstdint>
#include <cstdio>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Key = std::tuple<int64_t, int64_t, int64_t, int, int, int>;

struct Cached {
  dnnl::memory::desc a, b, c;
  dnnl::matmul prim;
};

dnnl::engine& Engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

const Cached& Get(int64_t m, int64_t k, int64_t n, bool ta, bool tb, dnnl::memory::data_type out_dt) {
  static std::mutex mu;
  static std::map<Key, Cached> cache;
  Key key{m, k, n, ta, tb, static_cast<int>(out_dt)};
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  using dt = dnnl::memory::data_type;
  // Logical a [m, k], b [k, n]; a transposed operand is stored row-major as [k, m] / [n, k].
  dnnl::memory::desc a_md({m, k}, dt::bf16, ta ? dnnl::memory::dims{1, m} : dnnl::memory::dims{k, 1});
  dnnl::memory::desc b_md({k, n}, dt::bf16, tb ? dnnl::memory::dims{1, k} : dnnl::memory::dims{n, 1});
  dnnl::memory::desc c_md({m, n}, out_dt, dnnl::memory::dims{n, 1});
  dnnl::matmul::primitive_desc pd(Engine(), a_md, b_md, c_md);
  auto res = cache.emplace(key, Cached{a_md, b_md, c_md, dnnl::matmul(pd)});
  return res.first->second;
}

ffi::Error Run(ffi::AnyBuffer a, ffi::AnyBuffer b, void* out, dnnl::memory::data_type out_dt, int32_t ta,
               int32_t tb) {
  auto ad = a.dimensions();
  auto bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 2) return ffi::Error::InvalidArgument("onednn matmul: operands must be 2-D");
  if (a.element_type() != ffi::DataType::BF16 || b.element_type() != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("onednn matmul: operands must be bf16");
  int64_t m = ta ? ad[1] : ad[0], k = ta ? ad[0] : ad[1];
  int64_t kb = tb ? bd[1] : bd[0], n = tb ? bd[0] : bd[1];
  if (k != kb) return ffi::Error::InvalidArgument("onednn matmul: contracting dimensions differ");
  try {
    const Cached& c = Get(m, k, n, ta != 0, tb != 0, out_dt);
    dnnl::stream s(Engine());
    dnnl::memory am(c.a, Engine(), a.untyped_data());
    dnnl::memory bm(c.b, Engine(), b.untyped_data());
    dnnl::memory cm(c.c, Engine(), out);
    c.prim.execute(s, {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm}});
    s.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("onednn matmul: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error MatmulF32(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::Buffer<ffi::F32>> out, int32_t ta,
                     int32_t tb) {
  return Run(a, b, out->untyped_data(), dnnl::memory::data_type::f32, ta, tb);
}

ffi::Error MatmulBF16(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::Buffer<ffi::BF16>> out, int32_t ta,
                      int32_t tb) {
  return Run(a, b, out->untyped_data(), dnnl::memory::data_type::bf16, ta, tb);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EmajaxOnednnMatmulF32, MatmulF32,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("trans_a")
                                  .Attr<int32_t>("trans_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EmajaxOnednnMatmulBF16, MatmulBF16,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Attr<int32_t>("trans_a")
                                  .Attr<int32_t>("trans_b"));

extern "C" const char* EmajaxOnednnVersion() {
  static char buf[32];
  const dnnl_version_t* v = dnnl_version();
  snprintf(buf, sizeof(buf), "%d.%d.%d", v->major, v->minor, v->patch);
  return buf;
}
