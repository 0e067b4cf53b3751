// The CUDA backend of the toy decoder (SPEC 5): fp32 cuBLAS SGEMMs for every projection
// (the B rows of a step are the GEMM's N dimension, so each weight is read once per step),
// kernels/memattn.cu for the masked memory attention (only kept chunks are read), and small
// kernels for embedding, RMSNorm, GELU and argmax. Memory keys/values are computed on the
// device once at construction; the host weights are not read again.
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "kernels/toy_decoder_kernels.hpp"
#include "src/common/cuda_support.hpp"
#include "src/common/error.hpp"
#include "toy_model/decoder_internal.hpp"

namespace flashmem {

namespace {
namespace tk = kernels::toy;

template <typename T>
void upload(DeviceBuffer<T>& dst, const std::vector<T>& src) {
  FM_CUDA(cudaMemcpy(dst.reserve(src.size()), src.data(), src.size() * sizeof(T), cudaMemcpyHostToDevice));
}

struct DeviceLayer {
  DeviceBuffer<float> wq, wo, mlp_up, mlp_down, attn_norm, mlp_norm, keys, values;
};

class CudaDecoder final : public Decoder {
 public:
  explicit CudaDecoder(std::shared_ptr<const ToyDecoderWeights> weights) : w_(std::move(weights)) {
    int devices = 0;
    const cudaError_t e = cudaGetDeviceCount(&devices);
    if (e != cudaSuccess || devices == 0)
      fail("--device cuda: no CUDA device (", e != cudaSuccess ? cudaGetErrorString(e) : "the runtime reports 0 devices", ")");
    if (const char* g = std::getenv("FLASHMEM_TOY_GEMM")) force_cublas_ = std::strcmp(g, "cublas") == 0;
    FM_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    FM_CUBLAS(cublasCreate(&blas_));
    FM_CUBLAS(cublasSetStream(blas_, stream_));
    // Default math: fp32 SGEMM, no TF32 (the fixture tokens need float32 products).
    FM_CUBLAS(cublasSetMathMode(blas_, CUBLAS_DEFAULT_MATH));

    const ToyDecoderWeights& w = *w_;
    const int64_t N = w.chunks, D = w.hidden;
    upload(embed_, w.embed);
    upload(final_norm_, w.final_norm);
    upload(lm_head_, w.lm_head);
    DeviceBuffer<float> memory, wk, wv;
    upload(memory, w.memory);
    layers_ = std::vector<std::unique_ptr<DeviceLayer>>(w.layers.size());
    for (auto& layer : layers_) layer = std::make_unique<DeviceLayer>();
    for (size_t l = 0; l < w.layers.size(); ++l) {
      const ToyDecoderLayer& src = w.layers[l];
      DeviceLayer& dst = *layers_[l];
      upload(dst.wq, src.wq);
      upload(dst.wo, src.wo);
      upload(dst.mlp_up, src.mlp_up);
      upload(dst.mlp_down, src.mlp_down);
      upload(dst.attn_norm, src.attn_norm);
      upload(dst.mlp_norm, src.mlp_norm);
      upload(wk, src.wk);
      upload(wv, src.wv);
      // keys [N, D] = memory [N, D] * wk^T; values likewise (once for the whole run).
      linear(wk.get(), D, D, memory.get(), N, dst.keys.reserve(N * D), 0.0f);
      linear(wv.get(), D, D, memory.get(), N, dst.values.reserve(N * D), 0.0f);
      FM_CUDA(cudaStreamSynchronize(stream_));  // before wk/wv are overwritten
    }
    plan_ = tk::memattn_plan(static_cast<int>(N));
  }
  ~CudaDecoder() override {
    cublasDestroy(blas_);
    cudaStreamDestroy(stream_);
  }

  const char* backend() const override { return "cuda"; }
  const ToyDecoderWeights& weights() const override { return *w_; }

  DecoderStep step(std::span<const int64_t> tokens, std::span<const uint8_t> keep, bool with_attention) override {
    const ToyDecoderWeights& w = *w_;
    const int64_t B = validate_step_inputs(w, tokens, keep);
    const int64_t D = w.hidden, V = w.vocab, N = w.chunks, H = w.heads, hs = D / H;
    const int64_t L = static_cast<int64_t>(layers_.size());
    const bool dense = keep.empty();

    DecoderStep out;
    out.batch = B;
    out.empty_rows = empty_keep_rows(B, N, keep);

    // Inputs: tokens and the keep-mask through pinned staging.
    int64_t* h_tok = h_tokens_.reserve(B);
    std::memcpy(h_tok, tokens.data(), B * sizeof(int64_t));
    FM_CUDA(cudaMemcpyAsync(d_tokens_.reserve(B), h_tok, B * sizeof(int64_t), cudaMemcpyHostToDevice, stream_));
    if (!dense) {
      uint8_t* h_keep = h_keep_.reserve(B * N);
      std::memcpy(h_keep, keep.data(), B * N);
      FM_CUDA(cudaMemcpyAsync(d_keep_.reserve(B * N), h_keep, B * N, cudaMemcpyHostToDevice, stream_));
      FM_CUDA(tk::compact_keep(d_keep_.get(), static_cast<int>(B), static_cast<int>(N), d_idx_.reserve(B * N),
                                      d_count_.reserve(B), stream_));
    }

    float* x = d_x_.reserve(B * D);
    float* xn = d_xn_.reserve(B * D);
    float* q = d_q_.reserve(B * D);
    float* att = d_att_.reserve(B * D);
    float* u = d_u_.reserve(B * 2 * D);
    float* hidden = d_hidden_.reserve(B * D);
    float* logits = d_logits_.reserve(B * V);
    int64_t* next = d_next_.reserve(B);
    float* probs = with_attention ? d_probs_.reserve(L * B * H * N) : nullptr;
    if (probs) FM_CUDA(cudaMemsetAsync(probs, 0, L * B * H * N * sizeof(float), stream_));
    float* workspace = d_workspace_.reserve(tk::memattn_workspace_floats(plan_, static_cast<int>(B), static_cast<int>(H), static_cast<int>(hs)));

    const int b32 = static_cast<int>(B), d32 = static_cast<int>(D);
    FM_CUDA(tk::embed_rows(embed_.get(), d_tokens_.get(), b32, d32, x, stream_));
    for (int64_t l = 0; l < L; ++l) {
      DeviceLayer& layer = *layers_[l];
      FM_CUDA(tk::rmsnorm_rows(x, layer.attn_norm.get(), b32, d32, xn, stream_));
      linear(layer.wq.get(), D, D, xn, B, q, 0.0f);
      tk::MemAttnParams p{};
      p.q = q;
      p.keys = layer.keys.get();
      p.values = layer.values.get();
      p.idx = dense ? nullptr : d_idx_.get();
      p.count = dense ? nullptr : d_count_.get();
      p.B = b32;
      p.N = static_cast<int>(N);
      p.heads = static_cast<int>(H);
      p.head_size = static_cast<int>(hs);
      p.plan = plan_;
      p.workspace = workspace;
      p.out = att;
      p.probs = probs ? probs + l * B * H * N : nullptr;
      FM_CUDA(tk::memattn(p, stream_));
      linear(layer.wo.get(), D, D, att, B, x, 1.0f);  // x += wo * att (beta = 1)
      FM_CUDA(tk::rmsnorm_rows(x, layer.mlp_norm.get(), b32, d32, xn, stream_));
      linear(layer.mlp_up.get(), 2 * D, D, xn, B, u, 0.0f);
      FM_CUDA(tk::gelu_inplace(u, B * 2 * D, stream_));
      linear(layer.mlp_down.get(), D, 2 * D, u, B, x, 1.0f);  // x += mlp_down * gelu(...)
    }
    FM_CUDA(tk::rmsnorm_rows(x, final_norm_.get(), b32, d32, hidden, stream_));
    linear(lm_head_.get(), V, D, hidden, B, logits, 0.0f);
    FM_CUDA(tk::argmax_rows(logits, b32, static_cast<int>(V), next, stream_));

    // Outputs through pinned staging, one synchronisation.
    const size_t out_floats = B * D + B * V + (probs ? L * B * H * N : 0);
    float* h_out = h_out_.reserve(out_floats);
    int64_t* h_next = h_next_.reserve(B);
    FM_CUDA(cudaMemcpyAsync(h_out, hidden, B * D * sizeof(float), cudaMemcpyDeviceToHost, stream_));
    FM_CUDA(cudaMemcpyAsync(h_out + B * D, logits, B * V * sizeof(float), cudaMemcpyDeviceToHost, stream_));
    if (probs) FM_CUDA(cudaMemcpyAsync(h_out + B * D + B * V, probs, L * B * H * N * sizeof(float), cudaMemcpyDeviceToHost, stream_));
    FM_CUDA(cudaMemcpyAsync(h_next, next, B * sizeof(int64_t), cudaMemcpyDeviceToHost, stream_));
    FM_CUDA(cudaStreamSynchronize(stream_));
    out.hidden.assign(h_out, h_out + B * D);
    out.logits.assign(h_out + B * D, h_out + B * D + B * V);
    if (probs) out.attention.assign(h_out + B * D + B * V, h_out + out_floats);
    out.next_token.assign(h_next, h_next + B);
    return out;
  }

 private:
  // y[rows, out] = x[rows, in] * W[out, in]^T + beta * y, row-major, as a column-major SGEMM:
  // y^T [out, rows] = W (col-major [in, out], transposed) * x^T (col-major [in, rows]).
  // At <= 4 rows (a decode step) the projection is a GEMV bound by reading W: the skinny
  // kernel streams W closer to the copy bandwidth than cuBLAS's SGEMM (bench_decoder prints
  // both); FLASHMEM_TOY_GEMM=cublas forces cuBLAS everywhere.
  void linear(const float* W, int64_t out_dim, int64_t in_dim, const float* x, int64_t rows, float* y, float beta) {
    if (!force_cublas_ && rows <= tk::kSkinnyMaxRows && in_dim % 4 == 0) {
      FM_CUDA(tk::skinny_linear(W, static_cast<int>(out_dim), static_cast<int>(in_dim), x, static_cast<int>(rows), y,
                                       beta, stream_));
      return;
    }
    const float alpha = 1.0f;
    FM_CUBLAS(cublasSgemm(blas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(out_dim), static_cast<int>(rows),
                                 static_cast<int>(in_dim), &alpha, W, static_cast<int>(in_dim), x, static_cast<int>(in_dim),
                                 &beta, y, static_cast<int>(out_dim)));
  }

  std::shared_ptr<const ToyDecoderWeights> w_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  tk::MemAttnPlan plan_;
  bool force_cublas_ = false;
  DeviceBuffer<float> embed_, final_norm_, lm_head_;
  std::vector<std::unique_ptr<DeviceLayer>> layers_;
  DeviceBuffer<int64_t> d_tokens_, d_next_;
  DeviceBuffer<uint8_t> d_keep_;
  DeviceBuffer<int32_t> d_idx_, d_count_;
  DeviceBuffer<float> d_x_, d_xn_, d_q_, d_att_, d_u_, d_hidden_, d_logits_, d_probs_, d_workspace_;
  PinnedBuffer<int64_t> h_tokens_, h_next_;
  PinnedBuffer<uint8_t> h_keep_;
  PinnedBuffer<float> h_out_;
};
}  // namespace

std::unique_ptr<Decoder> make_cuda_decoder(std::shared_ptr<const ToyDecoderWeights> weights) {
  if (weights->chunks > (int64_t{1} << 31) / 2 || weights->hidden > 65536)
    fail("--device cuda: the toy decoder's CUDA backend takes N < 2^30 chunks and hidden <= 65536");
  return std::make_unique<CudaDecoder>(std::move(weights));
}

}  // namespace flashmem
