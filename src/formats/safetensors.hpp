// safetensors files: a memory-mapped, validating reader with zero-copy typed views, and an
// atomic writer. Format: u64 little-endian header length, a JSON header
// {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the data.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace flashmem {

enum class DType { F32, F16, BF16, U8, I8, I16, I32, I64, BOOL };

const char* dtype_name(DType dtype);
size_t dtype_size(DType dtype);

// A tensor inside a mapped file. Valid as long as the SafetensorsFile lives.
struct TensorView {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::span<const std::byte> bytes;

  int64_t numel() const;
  // Typed view; throws if T does not match the dtype.
  template <typename T>
  std::span<const T> as() const;
};

class SafetensorsFile {
 public:
  // Maps and validates the whole header; throws Error naming the file on any defect.
  static SafetensorsFile open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(SafetensorsFile&&) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept;

  const std::string& path() const { return path_; }
  bool contains(const std::string& name) const;
  std::vector<std::string> names() const;  // sorted
  const TensorView& tensor(const std::string& name) const;  // throws naming file and key

  // Checked accessors: dtype and shape must match (-1 in shape = any size); throw naming key.
  const TensorView& expect(const std::string& name, std::initializer_list<DType> dtypes,
                           std::vector<int64_t> shape) const;
  // F32/F16/BF16 widened to float32 (a copy).
  std::vector<float> read_f32(const std::string& name) const;
  std::vector<int64_t> read_i64(const std::string& name) const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  std::map<std::string, TensorView> tensors_;
};

// Collects tensors and writes them atomically (temp name, then rename).
class SafetensorsWriter {
 public:
  void add(const std::string& name, DType dtype, std::vector<int64_t> shape, std::span<const std::byte> bytes);
  void add_f32(const std::string& name, std::vector<int64_t> shape, std::span<const float> values);
  void add_u8(const std::string& name, std::vector<int64_t> shape, std::span<const uint8_t> values);
  void add_i64(const std::string& name, std::vector<int64_t> shape, std::span<const int64_t> values);
  void add_bf16_bits(const std::string& name, std::vector<int64_t> shape, std::span<const uint16_t> bits);
  void write(const std::string& path) const;

 private:
  struct Entry {
    DType dtype;
    std::vector<int64_t> shape;
    std::vector<std::byte> bytes;
  };
  std::map<std::string, Entry> entries_;
};

// Widening helpers, exact: every BF16 and F16 value is representable in float32.
float bf16_bits_to_float(uint16_t bits);
float f16_bits_to_float(uint16_t bits);

}  // namespace flashmem
