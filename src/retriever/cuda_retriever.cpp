// The CUDA backend of Retriever: the projections (all layers' wq_a and weights_proj as one
// matrix, wq_b batched over layers) through cuBLAS, or at B <= 4 through our weight-streaming
// GEMV (kernels/gemv_kernel.cu, faster at the bandwidth-bound B = 1; there wq_b and the query
// finish are one kernel), then the kernels of kernels/ (query finish, scoring, selection). A
// score call's stream work (projections to scoring, and a threshold selection fused into fast
// mode's scoring kernel) is one CUDA graph, captured once per shape and buffer set and replayed:
// at B = 1 the launch overheads of its operations are a large part of the call. Every CUDA and
// cuBLAS call goes through FM_CUDA / FM_CUBLAS (file:line).
#include "src/retriever/cuda_retriever.hpp"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kernels/retriever_kernels.hpp"
#include "src/common/cuda_support.hpp"
#include "src/common/error.hpp"
#include "src/numerics/bf16.hpp"
#include "src/numerics/fp8.hpp"
#include "src/numerics/rope.hpp"

namespace flashmem {

namespace {

class CudaRetrieverImpl final : public CudaRetriever {
 public:
  CudaRetrieverImpl(std::shared_ptr<const RetrieverWeights> weights, RetrieverOptions options)
      : CudaRetriever(std::move(weights), options) {
    const RetrieverWeights& w = *weights_;
    L_ = static_cast<int>(w.layers.size());
    D_ = w.hidden;
    R_ = w.rank;
    H_ = w.heads;
    stride_ = R_ + H_;
    P_ = L_ * stride_;
    terms_ = options_.precision == Precision::Exact ? 2 : 1;
    fast_ = options_.precision == Precision::Fast;
    // Fast mode scores with e4m3 queries on fp8 wgmma (the keys are e4m3 already);
    // FLASHMEM_CUDA_FAST_SCORING=fp16 keeps the fp16 single-term scoring (for benchmarks).
    fp8_ = fast_;
    if (const char* v = std::getenv("FLASHMEM_CUDA_FAST_SCORING")) fp8_ = fast_ && std::string(v) != "fp16";
    max_layers_per_pass_ = kernels::score_max_layers_per_pass(static_cast<int>(H_), terms_, fp8_);
    if (max_layers_per_pass_ == 0) fail("cuda retriever: H = ", H_, " heads do not fit the scoring kernel's shared memory");
    // Projection path (for benchmarks): custom (default: our GEMV for B <= 4, cuBLAS above),
    // cublas (cuBLAS GEMM always), sgemv (cuBLAS GEMV at B = 1, exact mode).
    if (const char* v = std::getenv("FLASHMEM_CUDA_GEMV")) {
      const std::string mode = v;
      gemv_mode_ = mode == "cublas" ? GemvMode::Cublas : mode == "sgemv" ? GemvMode::Sgemv : GemvMode::Custom;
    }

    int device = 0;
    FM_CUDA(cudaGetDevice(&device));
    FM_CUDA(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, device));
    FM_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    FM_CUBLAS(cublasCreate(&blas_));
    FM_CUBLAS(cublasSetStream(blas_, stream_));
    FM_CUBLAS(cublasSetMathMode(blas_, CUBLAS_DEFAULT_MATH));  // no TF32: float32 products as on the CPU
    FM_CUBLAS(cublasSetWorkspace(blas_, workspace_.reserve(kWorkspaceBytes, "the cuBLAS workspace", &bytes_), kWorkspaceBytes));
    upload_weights();
    // The bad-chunk flag and the scoring kernel's block counter: armed once, then re-armed by
    // the kernel itself (kernels::ScoreParams).
    bad_flag_ = static_cast<unsigned long long*>(d_bad_.reserve(16, "the bad-chunk flag", &bytes_));
    FM_CUDA(cudaMemsetAsync(bad_flag_, 0xFF, 8, stream_));  // on stream_: ordered before the first call
    FM_CUDA(cudaMemsetAsync(bad_flag_ + 1, 0, 8, stream_));
    pinned_bad_.reserve(8);
    rows_ready_ = static_cast<unsigned*>(d_ready_.reserve((L_ + 1) * sizeof(unsigned), "the query side's row counters", &bytes_));
    FM_CUDA(cudaMemsetAsync(rows_ready_, 0, (L_ + 1) * sizeof(unsigned), stream_));  // then re-armed by the kernel
  }

  ~CudaRetrieverImpl() override {
    if (stream_) cudaStreamSynchronize(stream_);
    if (graph_exec_) cudaGraphExecDestroy(graph_exec_);
    if (blas_) cublasDestroy(blas_);
    if (stream_) cudaStreamDestroy(stream_);
  }

  const char* backend() const override { return "cuda"; }

  Scores score(const ScoreInputs& in, bool with_layer_logits) override {
    validate_inputs(in);
    const float* d_scores = score_host(in, with_layer_logits);
    return download_scores(d_scores, in.keys.batch, in.keys.chunks, with_layer_logits);
  }

  Selection retrieve(const ScoreInputs& in, const SelectRule& rule, Scores* scores_out) override {
    rule.validate();
    validate_inputs(in);
    const float* d_scores = score_host(in, false);
    const DeviceSelection sel = select_device(rule);
    const int64_t B = in.keys.batch, N = in.keys.chunks;
    Selection out{B, N, std::vector<uint8_t>(B * N), std::vector<int64_t>(B), {}};
    FM_CUDA(cudaMemcpyAsync(out.keep.data(), sel.keep, B * N, cudaMemcpyDeviceToHost, stream_));
    if (rule.kind == SelectRule::Kind::TopK) {
      const int64_t k = std::min(rule.top_k, N);
      out.top_indices.resize(B * k);
      FM_CUDA(cudaMemcpyAsync(out.top_indices.data(), sel.top_indices, B * k * sizeof(int64_t), cudaMemcpyDeviceToHost, stream_));
    }
    static_assert(sizeof(long long) == sizeof(int64_t));
    FM_CUDA(cudaMemcpyAsync(out.kept_count.data(), sel.kept_count, B * sizeof(int64_t), cudaMemcpyDeviceToHost, stream_));
    if (scores_out) *scores_out = download_scores(d_scores, B, N, false);
    wait();
    return out;
  }

  std::vector<float> layer_logits(size_t layer, const ScoreInputs& in) override {
    validate_inputs(in);
    if (layer >= weights_->layers.size()) fail("layer: ", layer, " is out of range (", weights_->layers.size(), " layers)");
    const int64_t B = in.keys.batch, N = in.keys.chunks;
    upload_host_inputs(in);
    run(d_hidden_.as<float>(), d_keys_.as<uint8_t>(), B, N, in.positions, true, static_cast<int>(layer), 1);
    check_bad_keys(&in.keys, nullptr, B, N);
    std::vector<float> out(B * N);
    FM_CUDA(cudaMemcpyAsync(out.data(), d_logits_.as<float>() + layer * B * N, B * N * sizeof(float), cudaMemcpyDeviceToHost, stream_));
    wait();
    return out;
  }

  const float* score_device(const DeviceInputs& in, bool with_layer_logits, bool check_keys) override {
    validate_device_inputs(in);
    run(in.hidden, in.keys, in.batch, in.chunks, in.positions, with_layer_logits, 0, L_);
    if (check_keys) check_bad_keys(nullptr, in.keys, in.batch, in.chunks);
    return d_scores_.as<float>();
  }

  const float* layer_logits_device() const override { return d_logits_.as<float>(); }

  DeviceSelection select_device(const SelectRule& rule) override {
    rule.validate();
    const int64_t B = last_B_, N = last_N_;
    if (B == 0) fail("select_device: no scores yet (call score_device first)");
    const Select s = prepare_selection(rule, B, N);
    enqueue_selection(s, B, N);
    return s.out;
  }

  DeviceSelection score_select_device(const DeviceInputs& in, const SelectRule& rule) override {
    rule.validate();
    validate_device_inputs(in);
    const Select s = prepare_selection(rule, in.batch, in.chunks);
    run(in.hidden, in.keys, in.batch, in.chunks, in.positions, false, 0, L_, &s);
    check_bad_keys(nullptr, in.keys, in.batch, in.chunks);
    return s.out;
  }

  void synchronize() override { wait(); }
  void* stream() const override { return stream_; }
  size_t device_bytes() const override { return bytes_; }

 private:
  static constexpr size_t kWorkspaceBytes = size_t{8} << 20;

  // Every wait for the stream goes through here, so run() knows when it need not wait (a
  // stream sync costs microseconds even on an idle stream).
  void wait() {
    FM_CUDA(cudaStreamSynchronize(stream_));
    graph_unwaited_ = false;
  }

  void upload_weights() {
    const RetrieverWeights& w = *weights_;
    const size_t a_elems = static_cast<size_t>(P_) * D_, b_elems = static_cast<size_t>(L_) * H_ * kKeyDim * R_;
    const size_t elem = fast_ ? 2 : 4;
    uint8_t* wa = static_cast<uint8_t*>(d_wa_.reserve(a_elems * elem, "the wq_a + weights_proj weights", &bytes_));
    uint8_t* wb = static_cast<uint8_t*>(d_wb_.reserve(b_elems * elem, "the wq_b weights", &bytes_));
    float* qn = static_cast<float*>(d_qnorm_.reserve(static_cast<size_t>(L_) * R_ * 4, "the q_norm weights", &bytes_));
    auto put = [&](uint8_t* dst, const std::vector<float>& src) {
      if (!fast_) {
        FM_CUDA(cudaMemcpy(dst, src.data(), src.size() * 4, cudaMemcpyHostToDevice));
        return;
      }
      std::vector<uint16_t> bits(src.size());
      for (size_t i = 0; i < src.size(); ++i) bits[i] = bf16_bits_from_float(src[i]);
      FM_CUDA(cudaMemcpy(dst, bits.data(), bits.size() * 2, cudaMemcpyHostToDevice));
    };
    for (int l = 0; l < L_; ++l) {
      const RetrieverLayer& layer = w.layers[l];
      put(wa + static_cast<size_t>(l) * stride_ * D_ * elem, layer.wq_a);
      put(wa + (static_cast<size_t>(l) * stride_ + R_) * D_ * elem, layer.weights_proj);
      put(wb + static_cast<size_t>(l) * H_ * kKeyDim * R_ * elem, layer.wq_b);
      FM_CUDA(cudaMemcpy(qn + static_cast<size_t>(l) * R_, layer.q_norm.data(), R_ * 4, cudaMemcpyHostToDevice));
    }
  }

  void validate_device_inputs(const DeviceInputs& in) const {
    const int64_t B = static_cast<int64_t>(in.positions.size());
    if (B == 0) fail("positions: batch size B = 0, expected at least one row");
    if (in.batch != B) fail("compressed_k: batch ", in.batch, " does not match positions (B = ", B, ")");
    if (in.chunks <= 0) fail("compressed_k: N = ", in.chunks, " chunks, expected at least one");
    if (!in.hidden || !in.keys) fail("score_device: hidden and compressed_k must be device pointers");
    if (reinterpret_cast<uintptr_t>(in.keys) % 4 != 0) fail("compressed_k: device pointer must be 4-byte aligned");
    for (int64_t b = 0; b < B; ++b)
      if (in.positions[b] < 0) fail("positions: row ", b, " is ", in.positions[b], ", expected >= 0");
  }

  void upload_host_inputs(const ScoreInputs& in) {
    const int64_t B = in.keys.batch, N = in.keys.chunks;
    const size_t key_bytes = static_cast<size_t>(B) * N * kChunkBytes;
    void* keys = d_keys_.reserve(key_bytes, "the compressed keys [B, N, 132]", &bytes_);
    void* hidden = d_hidden_.reserve(B * D_ * 4, "the hidden states", &bytes_);
    FM_CUDA(cudaMemcpyAsync(keys, in.keys.data, key_bytes, cudaMemcpyHostToDevice, stream_));
    FM_CUDA(cudaMemcpyAsync(hidden, in.hidden.data(), B * D_ * 4, cudaMemcpyHostToDevice, stream_));
  }

  const float* score_host(const ScoreInputs& in, bool with_layer_logits) {
    const int64_t B = in.keys.batch, N = in.keys.chunks;
    upload_host_inputs(in);
    run(d_hidden_.as<float>(), d_keys_.as<uint8_t>(), B, N, in.positions, with_layer_logits, 0, L_);
    check_bad_keys(&in.keys, nullptr, B, N);
    return d_scores_.as<float>();
  }

  Scores download_scores(const float* d_scores, int64_t B, int64_t N, bool with_layer_logits) {
    Scores out{B, N, std::vector<float>(B * N), {}};
    FM_CUDA(cudaMemcpyAsync(out.ensemble.data(), d_scores, B * N * 4, cudaMemcpyDeviceToHost, stream_));
    if (with_layer_logits) {
      out.layer_logits.assign(L_, std::vector<float>(B * N));
      for (int l = 0; l < L_; ++l)
        FM_CUDA(cudaMemcpyAsync(out.layer_logits[l].data(), d_logits_.as<float>() + l * B * N, B * N * 4,
                                cudaMemcpyDeviceToHost, stream_));
    }
    wait();
    return out;
  }

  // Waits for the scoring and throws, as the CPU backend does, naming the first bad chunk.
  void check_bad_keys(const CompressedKeysView* host_keys, const uint8_t* device_keys, int64_t B, int64_t N) {
    const unsigned long long* staged = static_cast<const unsigned long long*>(pinned_bad_.reserve(8));  // the scoring kernel writes it
    wait();
    const unsigned long long first = *staged;
    if (first == ~0ull) return;
    const int64_t b = static_cast<int64_t>(first) / N, n = static_cast<int64_t>(first) % N;
    uint8_t chunk[kChunkBytes];
    if (host_keys) std::memcpy(chunk, host_keys->chunk(b, n), kChunkBytes);
    else FM_CUDA(cudaMemcpy(chunk, device_keys + first * kChunkBytes, kChunkBytes, cudaMemcpyDeviceToHost));
    (void)B;
    validate_chunk(chunk, b, n);
    fail("compressed_k: batch row ", b, " chunk ", n, " was flagged by the device check but looks valid");
  }

  // A selection's rule and buffers (prepare_selection reserves them; enqueue_selection runs it).
  struct Select {
    SelectRule::Kind kind;
    float threshold;
    int64_t k;
    DeviceSelection out;
    void* scratch;
    size_t scratch_bytes;
    bool operator==(const Select& o) const {
      return kind == o.kind && threshold == o.threshold && k == o.k && out.keep == o.out.keep &&
             out.kept_count == o.out.kept_count && out.top_indices == o.out.top_indices && scratch == o.scratch &&
             scratch_bytes == o.scratch_bytes;
    }
  };

  Select prepare_selection(const SelectRule& rule, int64_t B, int64_t N) {
    if (N > INT32_MAX) fail("selection: N = ", N, " chunks is more than the device selection supports (2^31 - 1)");
    Select s{rule.kind, rule.threshold, 0, {}, nullptr, 0};
    s.out.keep = static_cast<uint8_t*>(d_keep_.reserve(B * N, "the keep mask [B, N]", &bytes_));
    s.out.kept_count = static_cast<long long*>(d_count_.reserve(B * sizeof(long long), "the kept counts", &bytes_));
    if (rule.kind == SelectRule::Kind::Threshold) {
      s.scratch_bytes = kernels::threshold_scratch_bytes(B, N);
      const bool fresh = s.scratch_bytes > d_threshold_scratch_.size_bytes();
      s.scratch = d_threshold_scratch_.reserve(s.scratch_bytes, "the threshold selection scratch", &bytes_);
      // Zeroed once, then kept zero by whichever form runs: the selection kernel, or the fused
      // one, whose counts use its first B words (threshold_scratch_bytes >= B * 4).
      if (fresh) FM_CUDA(cudaMemsetAsync(s.scratch, 0, s.scratch_bytes, stream_));
    } else {
      s.k = std::min(rule.top_k, N);
      s.out.top_indices = static_cast<int64_t*>(d_top_.reserve(B * s.k * sizeof(int64_t), "the top-k indices", &bytes_));
      s.scratch_bytes = kernels::topk_scratch_bytes(N);
      s.scratch = d_topk_scratch_.reserve(s.scratch_bytes, "the top-k sort scratch", &bytes_);
    }
    return s;
  }

  void enqueue_selection(const Select& s, int64_t B, int64_t N) {
    uint8_t* keep = const_cast<uint8_t*>(s.out.keep);
    long long* count = const_cast<long long*>(s.out.kept_count);
    if (s.kind == SelectRule::Kind::Threshold)
      FM_CUDA(kernels::select_threshold(d_scores_.as<float>(), B, N, s.threshold, keep, count, s.scratch, stream_));
    else
      FM_CUDA(kernels::select_topk(d_scores_.as<float>(), B, N, s.k, s.scratch, s.scratch_bytes, keep,
                                   const_cast<int64_t*>(s.out.top_indices), count, stream_));
  }

  // Everything one score call enqueues, with the buffers it uses: a call replays a CUDA graph
  // of these stream operations, captured once per distinct Launch (shapes and pointers).
  struct Launch {
    const float* hidden;
    const uint8_t* keys;
    int64_t B, N;
    int layer0, count;
    bool custom_gemv;
    float *proj, *qraw, *wsc, *scores, *logits;
    const float* angles;  // device view of the pinned staging
    void *a, *qfrag, *xb;
    size_t frag_bytes;
    unsigned long long *staged_bad;
    bool with_select;
    Select select;  // when with_select: the selection, in the same graph
    bool operator==(const Launch&) const = default;
  };

  // The whole pipeline: projections, query finish, scoring of layers [layer0, layer0 + count)
  // (all layers' queries are computed); the scoring kernel leaves the bad-chunk flag in pinned
  // memory. Host work (buffers, the RoPE angles, read by the query kernel straight from pinned
  // memory) here; the stream work is one graph launch.
  void run(const float* hidden, const uint8_t* keys, int64_t B, int64_t N, std::span<const int64_t> positions,
           bool with_layer_logits, int layer0, int count, const Select* select = nullptr) {
    const int Hp = kernels::padded_heads(static_cast<int>(H_));
    Launch x{};
    x.with_select = select != nullptr;
    if (select) x.select = *select;
    x.hidden = hidden;
    x.keys = keys;
    x.B = B;
    x.N = N;
    x.layer0 = layer0;
    x.count = count;
    x.custom_gemv = gemv_mode_ == GemvMode::Custom && kernels::gemv_supported(static_cast<int>(B), static_cast<int>(D_), fast_) &&
                    kernels::gemv_supported(static_cast<int>(B), static_cast<int>(R_), fast_) &&
                    reinterpret_cast<uintptr_t>(hidden) % 16 == 0;
    x.proj = static_cast<float*>(d_proj_.reserve(B * P_ * 4, "the projections [B, L*(R+H)]", &bytes_));
    x.a = d_a_.reserve(static_cast<size_t>(L_) * B * R_ * 4, "the normalised q-LoRA [L, B, R]", &bytes_);
    if (!x.custom_gemv)  // the fused kernel of the custom path keeps its raw queries on chip
      x.qraw = static_cast<float*>(d_qraw_.reserve(static_cast<size_t>(L_) * B * H_ * kKeyDim * 4, "the raw queries", &bytes_));
    x.frag_bytes = static_cast<size_t>(B) * L_ * kernels::query_fragment_bytes(static_cast<int>(H_), terms_, fp8_);
    x.qfrag = d_qfrag_.reserve(x.frag_bytes, "the query fragments", &bytes_);
    x.wsc = static_cast<float*>(d_w_.reserve(static_cast<size_t>(B) * L_ * Hp * 4, "the head weights", &bytes_));
    x.scores = static_cast<float*>(d_scores_.reserve(static_cast<size_t>(B) * N * 4, "the scores [B, N]", &bytes_));
    if (with_layer_logits)
      x.logits = static_cast<float*>(d_logits_.reserve(static_cast<size_t>(L_) * B * N * 4, "the per-layer logits [L, B, N]", &bytes_));
    if (!x.custom_gemv && fast_) x.xb = d_xbf16_.reserve(B * D_ * 2, "the bf16 hidden states", &bytes_);
    x.staged_bad = static_cast<unsigned long long*>(pinned_bad_.device_ptr());
    float* staged_angles = static_cast<float*>(pinned_angles_.reserve(B * 64 * 4));
    x.angles = static_cast<const float*>(pinned_angles_.device_ptr());

    // RoPE angles on the host by the CPU's own function (identical cos/sin on both backends).
    if (graph_unwaited_) wait();  // the pinned angles may still be read by the last graph
    for (int64_t b = 0; b < B; ++b) {
      const RopeAngles ang = rope_at(positions[b], options_.max_position);
      for (int i = 0; i < kRopePairs; ++i) {
        staged_angles[(b * 32 + i) * 2] = ang.cos[i];
        staged_angles[(b * 32 + i) * 2 + 1] = ang.sin[i];
      }
    }
    if (!graph_exec_ || !(x == graph_launch_)) capture(x);
    FM_CUDA(cudaGraphLaunch(graph_exec_, stream_));
    graph_unwaited_ = true;
    last_B_ = B;
    last_N_ = N;
  }

  // Captures enqueue(x) into graph_exec_ (replacing the previous graph).
  void capture(const Launch& x) {
    if (graph_exec_) FM_CUDA(cudaGraphExecDestroy(graph_exec_));
    graph_exec_ = nullptr;
    FM_CUDA(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeRelaxed));
    cudaGraph_t graph = nullptr;
    try {
      enqueue(x);
    } catch (...) {
      cudaStreamEndCapture(stream_, &graph);  // leave capture mode; the error in flight wins
      if (graph) cudaGraphDestroy(graph);
      throw;
    }
    FM_CUDA(cudaStreamEndCapture(stream_, &graph));
    const cudaError_t err = cudaGraphInstantiate(&graph_exec_, graph, 0);
    FM_CUDA(cudaGraphDestroy(graph));
    FM_CUDA(err);
    graph_launch_ = x;
  }

  void enqueue(const Launch& x) {
    const int64_t B = x.B;
    const int Hp = kernels::padded_heads(static_cast<int>(H_));
    if (Hp != H_) {
      FM_CUDA(cudaMemsetAsync(x.qfrag, 0, x.frag_bytes, stream_));
      FM_CUDA(cudaMemsetAsync(x.wsc, 0, static_cast<size_t>(B) * L_ * Hp * 4, stream_));
    }

    const float one = 1.0f, zero = 0.0f;
    const int HD = static_cast<int>(H_ * kKeyDim);
    float* proj = x.proj;
    float* qraw = x.qraw;
    void* a = x.a;
    kernels::QueryFinish f{};
    f.proj = proj;
    f.P = P_;
    f.stride = stride_;
    f.R = R_;
    f.angles = x.angles;
    f.L = L_;
    f.B = static_cast<int>(B);
    f.H = static_cast<int>(H_);
    f.head_scale = static_cast<float>(std::pow(128.0, -0.5) * std::pow(static_cast<double>(H_), -0.5));
    f.terms = terms_;
    f.fp8 = fp8_;
    f.qfrag = x.qfrag;
    f.w_scaled = x.wsc;
    if (x.custom_gemv) {  // small batch: our weight-streaming GEMV (kernels/gemv_kernel.cu)
      // wq_b with the query finish in the same kernel, and the rmsnorm too where its rows fit in
      // shared memory (each kernel fewer in the chain is a launch gap and a wait fewer). Then it
      // reads the gemv's rows itself, so it starts on each layer as the gemv counts that layer's
      // rows written (rows_ready_) instead of at the gemv's end.
      const bool normalises = kernels::project_finish_normalises(static_cast<int>(B), static_cast<int>(R_));
      unsigned* handoff = normalises ? rows_ready_ : nullptr;
      FM_CUDA(kernels::gemv(d_wa_.as<void>(), fast_, P_, static_cast<int>(D_), 0, 1, x.hidden, 0, D_, static_cast<int>(B),
                            proj, 0, P_, /*chained=*/false, stream_, handoff, stride_));
      const float* q_in = proj;  // layer l's row b at q_in + l * q_lstride + b * q_bstride
      int64_t q_lstride = stride_, q_bstride = P_;
      const float* q_norm = d_qnorm_.as<float>();
      if (!normalises) {  // normalised rows as input
        FM_CUDA(kernels::rmsnorm_rows(proj, P_, stride_, q_norm, L_, B, R_, a, false, stream_));
        q_in = static_cast<const float*>(a);
        q_lstride = B * R_;
        q_bstride = R_;
        q_norm = nullptr;
      }
      FM_CUDA(kernels::project_finish_queries(d_wb_.as<void>(), fast_, static_cast<int>(R_), static_cast<int64_t>(HD) * R_,
                                              q_in, q_lstride, q_bstride, q_norm, f, stream_, handoff,
                                              static_cast<unsigned>(stride_)));
    } else if (!fast_) {
      const float* wa = d_wa_.as<float>();
      const float* wb = d_wb_.as<float>();
      const bool sgemv = B == 1 && gemv_mode_ == GemvMode::Sgemv;
      if (sgemv) {
        FM_CUBLAS(cublasSgemv(blas_, CUBLAS_OP_T, D_, P_, &one, wa, D_, x.hidden, 1, &zero, proj, 1));
      } else {
        FM_CUBLAS(cublasSgemm(blas_, CUBLAS_OP_T, CUBLAS_OP_N, P_, B, D_, &one, wa, D_, x.hidden, D_, &zero, proj, P_));
      }
      FM_CUDA(kernels::rmsnorm_rows(proj, P_, stride_, d_qnorm_.as<float>(), L_, B, R_, a, false, stream_));
      if (sgemv) {
        FM_CUBLAS(cublasSgemvStridedBatched(blas_, CUBLAS_OP_T, R_, HD, &one, wb, R_, static_cast<long long>(HD) * R_,
                                            static_cast<const float*>(a), 1, R_, &zero, qraw, 1, HD, L_));
      } else {
        FM_CUBLAS(cublasSgemmStridedBatched(blas_, CUBLAS_OP_T, CUBLAS_OP_N, HD, B, R_, &one, wb, R_,
                                            static_cast<long long>(HD) * R_, static_cast<const float*>(a), R_, B * R_,
                                            &zero, qraw, HD, static_cast<long long>(B) * HD, L_));
      }
    } else {
      FM_CUDA(kernels::to_bf16(x.hidden, x.xb, B * D_, stream_));
      FM_CUBLAS(cublasGemmEx(blas_, CUBLAS_OP_T, CUBLAS_OP_N, P_, B, D_, &one, d_wa_.as<void>(), CUDA_R_16BF, D_, x.xb,
                             CUDA_R_16BF, D_, &zero, proj, CUDA_R_32F, P_, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      FM_CUDA(kernels::rmsnorm_rows(proj, P_, stride_, d_qnorm_.as<float>(), L_, B, R_, a, true, stream_));
      FM_CUBLAS(cublasGemmStridedBatchedEx(blas_, CUBLAS_OP_T, CUBLAS_OP_N, HD, B, R_, &one, d_wb_.as<void>(), CUDA_R_16BF,
                                           R_, static_cast<long long>(HD) * R_, a, CUDA_R_16BF, R_, B * R_, &zero, qraw,
                                           CUDA_R_32F, HD, static_cast<long long>(B) * HD, L_, CUBLAS_COMPUTE_32F,
                                           CUBLAS_GEMM_DEFAULT));
    }
    if (!x.custom_gemv) FM_CUDA(kernels::finish_queries(qraw, f, stream_));  // the custom path finished in-kernel

    // A threshold selection is fused into the fp8 scoring's last pass (no kernel and no pass
    // over the scores of its own); top-k, and exact mode's selection, run after it.
    const bool fused_threshold = x.with_select && x.select.kind == SelectRule::Kind::Threshold && fp8_;
    for (int l = x.layer0; l < x.layer0 + x.count; l += max_layers_per_pass_) {
      kernels::ScoreParams p{};
      p.keys = x.keys;
      p.qfrag = x.qfrag;
      p.w_scaled = x.wsc;
      p.batch = B;
      p.chunks = x.N;
      p.total_layers = L_;
      p.layer0 = l;
      p.layer_count = std::min(max_layers_per_pass_, x.layer0 + x.count - l);
      p.terms = terms_;
      p.fp8 = fp8_;
      p.heads = static_cast<int>(H_);
      p.ensemble_mean = options_.ensemble == Ensemble::Mean;
      p.first_pass = l == x.layer0;
      p.last_pass = l + p.layer_count == x.layer0 + x.count;
      p.scores = x.scores;
      p.layer_logits = x.logits;
      p.bad_chunk = bad_flag_;
      p.bad_chunk_out = x.staged_bad;
      p.blocks_done = reinterpret_cast<unsigned*>(bad_flag_ + 1);
      const kernels::FusedThreshold select{const_cast<uint8_t*>(x.select.out.keep), x.select.threshold,
                                           static_cast<unsigned*>(x.select.scratch),
                                           const_cast<long long*>(x.select.out.kept_count)};
      FM_CUDA(kernels::score_chunks(p, sm_count_, stream_, fused_threshold && p.last_pass ? &select : nullptr));
    }
    if (x.with_select && !fused_threshold) enqueue_selection(x.select, B, x.N);
  }

  int L_ = 0;
  int64_t D_ = 0, R_ = 0, H_ = 0, stride_ = 0, P_ = 0;
  int terms_ = 2, max_layers_per_pass_ = 0, sm_count_ = 0;
  bool fast_ = false, fp8_ = false;
  enum class GemvMode { Custom, Cublas, Sgemv } gemv_mode_ = GemvMode::Custom;
  int64_t last_B_ = 0, last_N_ = 0;
  bool graph_unwaited_ = false;  // a graph was launched since the last wait()
  size_t bytes_ = 0;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  DeviceBuffer<> workspace_, d_wa_, d_wb_, d_qnorm_;
  DeviceBuffer<> d_keys_, d_hidden_, d_xbf16_, d_proj_, d_a_, d_qraw_, d_qfrag_, d_w_, d_scores_, d_logits_,
      d_bad_, d_ready_, d_keep_, d_count_, d_top_, d_topk_scratch_, d_threshold_scratch_;
  PinnedBuffer<> pinned_angles_, pinned_bad_;
  unsigned long long* bad_flag_ = nullptr;  // [0]: the flag, [1]: the scoring kernel's block counter
  unsigned* rows_ready_ = nullptr;          // [L + 1]: gemv rows written per layer, and a ticket
  cudaGraphExec_t graph_exec_ = nullptr;
  Launch graph_launch_{};
};

}  // namespace

bool cuda_device_present(std::string* why_not) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    if (why_not) *why_not = std::string("no usable CUDA device: ") + cudaGetErrorString(err);
    return false;
  }
  if (count == 0) {
    if (why_not) *why_not = "no CUDA device is present";
    return false;
  }
  return true;
}

std::unique_ptr<Retriever> make_cuda_retriever(std::shared_ptr<const RetrieverWeights> weights, RetrieverOptions options) {
  return std::make_unique<CudaRetrieverImpl>(std::move(weights), options);
}

}  // namespace flashmem
