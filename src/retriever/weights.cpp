#include "src/retriever/weights.hpp"

#include <algorithm>
#include <set>

#include "src/common/error.hpp"
#include "src/numerics/bf16.hpp"
#include "src/numerics/hadamard.hpp"

namespace flashmem {

namespace {
const std::string kPrefix = "retrievers.";
const char* const kWeightNames[] = {"wq_a.weight", "q_norm_weight", "wq_b.weight", "weights_proj.weight"};
}  // namespace

size_t RetrieverWeights::parameter_bytes() const {
  size_t floats = 0;
  for (const auto& l : layers) floats += l.wq_a.size() + l.q_norm.size() + l.wq_b.size() + l.weights_proj.size();
  return floats * sizeof(float);
}

RetrieverWeights load_retriever(const std::string& path, const std::vector<std::string>& layer_names) {
  const SafetensorsFile file = SafetensorsFile::open(path);

  std::set<std::string> available;  // std::set: string-sorted, the reference's layer order
  for (const auto& name : file.names()) {
    if (name.rfind(kPrefix, 0) != 0) continue;
    const auto dot = name.find('.', kPrefix.size());
    if (dot == std::string::npos) fail(path, ": key '", name, "' is not retrievers.<layer>.<weight>");
    available.insert(name.substr(kPrefix.size(), dot - kPrefix.size()));
  }
  if (available.empty()) fail(path, ": no 'retrievers.<layer>.*' keys; is this a FlashMemory retriever checkpoint?");

  std::vector<std::string> order = layer_names.empty() ? std::vector<std::string>(available.begin(), available.end()) : layer_names;
  for (const auto& name : order)
    if (!available.count(name)) {
      std::string known;
      for (const auto& a : available) known += (known.empty() ? "" : ", ") + a;
      fail(path, ": unknown layer '", name, "', the file has ", known);
    }

  RetrieverWeights weights;
  const auto& first = file.tensor(kPrefix + order[0] + ".wq_a.weight");
  if (first.shape.size() != 2) fail(path, ": key '", first.name, "' must be 2-D [rank, hidden]");
  weights.rank = first.shape[0];
  weights.hidden = first.shape[1];
  const auto& proj = file.tensor(kPrefix + order[0] + ".weights_proj.weight");
  if (proj.shape.size() != 2 || proj.shape[0] <= 0) fail(path, ": key '", proj.name, "' must be 2-D [heads, hidden]");
  weights.heads = proj.shape[0];
  if (weights.rank <= 0 || weights.hidden <= 0) fail(path, ": key '", first.name, "' has an empty dimension");

  const int64_t D = weights.hidden, R = weights.rank, H = weights.heads;
  const std::initializer_list<DType> floats = {DType::F32, DType::BF16, DType::F16};
  for (const auto& name : order) {
    const std::string p = kPrefix + name + ".";
    for (const char* w : kWeightNames)
      if (!file.contains(p + w)) fail(path, ": missing weight '", p + w, "'");
    RetrieverLayer layer;
    layer.name = name;
    file.expect(p + "wq_a.weight", floats, {R, D});
    file.expect(p + "q_norm_weight", floats, {R});
    file.expect(p + "wq_b.weight", floats, {H * kHeadDim, R});
    file.expect(p + "weights_proj.weight", floats, {H, D});
    layer.wq_a = file.read_f32(p + "wq_a.weight");
    layer.q_norm = file.read_f32(p + "q_norm_weight");
    layer.wq_b = file.read_f32(p + "wq_b.weight");
    layer.weights_proj = file.read_f32(p + "weights_proj.weight");
    weights.layers.push_back(std::move(layer));
  }
  return weights;
}

void save_retriever(const RetrieverWeights& weights, const std::string& path, DType dtype) {
  if (dtype != DType::F32 && dtype != DType::BF16) fail(path, ": checkpoints are written as F32 or BF16");
  const int64_t D = weights.hidden, R = weights.rank, H = weights.heads;
  SafetensorsWriter writer;
  auto put = [&](const std::string& key, std::vector<int64_t> shape, const std::vector<float>& values) {
    if (dtype == DType::F32) return writer.add_f32(key, std::move(shape), values);
    std::vector<uint16_t> bits(values.size());
    std::transform(values.begin(), values.end(), bits.begin(), bf16_bits_from_float);
    writer.add_bf16_bits(key, std::move(shape), bits);
  };
  for (const auto& layer : weights.layers) {
    const std::string p = kPrefix + layer.name + ".";
    put(p + "wq_a.weight", {R, D}, layer.wq_a);
    put(p + "q_norm_weight", {R}, layer.q_norm);
    put(p + "wq_b.weight", {H * kHeadDim, R}, layer.wq_b);
    put(p + "weights_proj.weight", {H, D}, layer.weights_proj);
  }
  writer.write(path);
}

}  // namespace flashmem
