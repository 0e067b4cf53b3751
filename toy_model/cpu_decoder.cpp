// The CPU backend of the toy decoder (SPEC 5): Eigen, all B rows of a step batched so each
// weight matrix is read once per step, weight rows split across threads (at small B a step
// is bound by reading ~1 GB of weights at D 4096). Memory keys/values [N, D] per layer are
// computed once at construction.
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <limits>

#include "src/common/error.hpp"
#include "src/common/parallel.hpp"
#include "src/numerics/rmsnorm.hpp"
#include "toy_model/decoder_internal.hpp"

namespace flashmem {

namespace {
using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ConstRowMap = Eigen::Map<const RowMatrix>;
using RowMap = Eigen::Map<RowMatrix>;
using ConstVecMap = Eigen::Map<const Eigen::VectorXf>;

constexpr int64_t kRowBlock = 64;  // weight rows per parallel_for unit
constexpr int64_t kSmallBatch = 8;  // up to here a row-by-row dot beats Eigen's packing GEMM

// Y[B, out] = X[B, in] * W[out, in]^T. Weight rows are split across threads; at small B each
// weight row is loaded once and dotted with every input row while it sits in L1.
void linear(const std::vector<float>& w, int64_t out_dim, int64_t in_dim, const float* x, int64_t batch, float* y) {
  parallel_for((out_dim + kRowBlock - 1) / kRowBlock, [&](int64_t begin, int64_t end) {
    const int64_t r0 = begin * kRowBlock, r1 = std::min(end * kRowBlock, out_dim);
    if (batch <= kSmallBatch) {
      for (int64_t r = r0; r < r1; ++r) {
        const ConstVecMap wr(w.data() + r * in_dim, in_dim);
        for (int64_t b = 0; b < batch; ++b) y[b * out_dim + r] = wr.dot(ConstVecMap(x + b * in_dim, in_dim));
      }
    } else {
      ConstRowMap W(w.data(), out_dim, in_dim);
      ConstRowMap X(x, batch, in_dim);
      RowMap Y(y, batch, out_dim);
      Y.middleCols(r0, r1 - r0).noalias() = X * W.middleRows(r0, r1 - r0).transpose();
    }
  });
}

// out[N, D] = memory[N, D] * W[D, D]^T (construction only: a real GEMM).
std::vector<float> project_memory(const std::vector<float>& memory, const std::vector<float>& w, int64_t n, int64_t d) {
  std::vector<float> out(n * d);
  ConstRowMap M(memory.data(), n, d);
  ConstRowMap W(w.data(), d, d);
  RowMap O(out.data(), n, d);
  parallel_for((n + 255) / 256, [&](int64_t begin, int64_t end) {
    const int64_t r0 = begin * 256, r1 = std::min(end * 256, n);
    O.middleRows(r0, r1 - r0).noalias() = M.middleRows(r0, r1 - r0) * W.transpose();
  });
  return out;
}

class CpuDecoder final : public Decoder {
 public:
  explicit CpuDecoder(std::shared_ptr<const ToyDecoderWeights> weights) : w_(std::move(weights)) {
    const int64_t N = w_->chunks, D = w_->hidden;
    for (const auto& layer : w_->layers) {
      keys_.push_back(project_memory(w_->memory, layer.wk, N, D));
      values_.push_back(project_memory(w_->memory, layer.wv, N, D));
    }
  }
  const char* backend() const override { return "cpu"; }
  const ToyDecoderWeights& weights() const override { return *w_; }

  DecoderStep step(std::span<const int64_t> tokens, std::span<const uint8_t> keep, bool with_attention) override {
    const ToyDecoderWeights& w = *w_;
    const int64_t B = validate_step_inputs(w, tokens, keep);
    const int64_t D = w.hidden, V = w.vocab, N = w.chunks, H = w.heads;
    const int64_t L = static_cast<int64_t>(w.layers.size());

    DecoderStep out;
    out.batch = B;
    out.empty_rows = empty_keep_rows(B, N, keep);
    if (with_attention) out.attention.assign(L * B * H * N, 0.0f);

    std::vector<float> x(B * D), xn(B * D), t(B * D), u(B * 2 * D);
    for (int64_t b = 0; b < B; ++b) std::copy_n(w.embed.data() + tokens[b] * D, D, x.data() + b * D);
    auto norm_rows = [&](const std::vector<float>& weight, std::vector<float>& dst) {
      for (int64_t b = 0; b < B; ++b)
        rmsnorm(std::span<const float>(x.data() + b * D, D), weight, std::span<float>(dst.data() + b * D, D));
    };
    auto add_to_x = [&](const std::vector<float>& delta) {
      for (int64_t i = 0; i < B * D; ++i) x[i] += delta[i];
    };

    for (int64_t l = 0; l < L; ++l) {
      const ToyDecoderLayer& layer = w.layers[l];
      norm_rows(layer.attn_norm, xn);
      linear(layer.wq, D, D, xn.data(), B, t.data());  // q
      memory_attention(l, t, keep, B, xn, with_attention ? out.attention.data() + l * B * H * N : nullptr);
      linear(layer.wo, D, D, xn.data(), B, t.data());
      add_to_x(t);
      norm_rows(layer.mlp_norm, xn);
      linear(layer.mlp_up, 2 * D, D, xn.data(), B, u.data());
      for (float& v : u) v = gelu_erf(v);
      linear(layer.mlp_down, D, 2 * D, u.data(), B, t.data());
      add_to_x(t);
    }
    out.hidden.resize(B * D);
    norm_rows(w.final_norm, out.hidden);
    out.logits.resize(B * V);
    linear(w.lm_head, V, D, out.hidden.data(), B, out.logits.data());
    out.next_token.resize(B);
    for (int64_t b = 0; b < B; ++b) {
      const float* row = out.logits.data() + b * V;
      out.next_token[b] = std::max_element(row, row + V) - row;  // first maximum: lowest index on ties
    }
    return out;
  }

 private:
  // att[B, D] = per head softmax over kept chunks of q.k/sqrt(hs), times values. Pass 1 splits
  // chunks across threads (each key row read once for all rows that keep it); pass 2 splits
  // value columns across threads (each value element read once). probs: [B, H, N] or null.
  void memory_attention(int64_t layer, const std::vector<float>& q, std::span<const uint8_t> keep, int64_t B,
                        std::vector<float>& att, float* probs) const {
    const int64_t N = w_->chunks, D = w_->hidden, H = w_->heads, hs = D / H;
    const float* K = keys_[layer].data();
    const float* Vv = values_[layer].data();
    const float scale_div = std::sqrt(static_cast<float>(hs));
    constexpr float kNegInf = -std::numeric_limits<float>::infinity();
    auto kept = [&](int64_t b, int64_t n) { return keep.empty() || keep[b * N + n] != 0; };

    // Pass 1: logits s[b, h, n] (-inf where not kept).
    std::vector<float> s(B * H * N, kNegInf);
    parallel_for((N + 63) / 64, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin * 64; n < std::min(end * 64, N); ++n)
        for (int64_t b = 0; b < B; ++b) {
          if (!kept(b, n)) continue;
          for (int64_t h = 0; h < H; ++h) {
            const float dot = ConstVecMap(q.data() + b * D + h * hs, hs).dot(ConstVecMap(K + n * D + h * hs, hs));
            s[(b * H + h) * N + n] = dot / scale_div;
          }
        }
    });
    // Softmax per (row, head) in place; a row with nothing kept gets all zeros (SPEC 5: an
    // empty kept set contributes zero instead of the reference's NaN).
    parallel_for(B * H, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        float* row = s.data() + bh * N;
        const float m = *std::max_element(row, row + N);
        if (m == kNegInf) {
          std::fill(row, row + N, 0.0f);
          continue;
        }
        double sum = 0.0;  // double: an order-independent, closer-to-exact normaliser
        for (int64_t n = 0; n < N; ++n) {
          row[n] = std::exp(row[n] - m);  // exp(-inf) = 0 for masked chunks
          sum += row[n];
        }
        const float total = static_cast<float>(sum);
        for (int64_t n = 0; n < N; ++n) row[n] /= total;
      }
    });
    if (probs) std::copy(s.begin(), s.end(), probs);
    // Pass 2: att[b, h*hs + c] = sum_n p[b, h, n] * V[n, h*hs + c], in column blocks of <= 64.
    const int64_t col_blocks = (hs + 63) / 64;
    std::fill(att.begin(), att.begin() + B * D, 0.0f);
    parallel_for(H * col_blocks, [&](int64_t begin, int64_t end) {
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t h = unit / col_blocks, c0 = h * hs + (unit % col_blocks) * 64;
        const int64_t width = std::min<int64_t>(64, h * hs + hs - c0);
        for (int64_t n = 0; n < N; ++n)  // chunk outer: a value block is read once for all rows
          for (int64_t b = 0; b < B; ++b) {
            const float p = s[(b * H + h) * N + n];
            if (p == 0.0f) continue;  // masked (or underflowed: adds exactly nothing)
            Eigen::Map<Eigen::VectorXf>(att.data() + b * D + c0, width) += p * ConstVecMap(Vv + n * D + c0, width);
          }
      }
    });
  }

  std::shared_ptr<const ToyDecoderWeights> w_;
  std::vector<std::vector<float>> keys_, values_;  // per layer [N, D]
};
}  // namespace

std::unique_ptr<Decoder> make_cpu_decoder(std::shared_ptr<const ToyDecoderWeights> weights) {
  return std::make_unique<CpuDecoder>(std::move(weights));
}

}  // namespace flashmem
