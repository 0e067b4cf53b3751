#include "src/formats/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>
#include <sstream>

#include "src/common/atomic_file.hpp"
#include "src/common/error.hpp"

namespace flashmem {

namespace {

struct DTypeInfo {
  DType dtype;
  const char* name;
  size_t size;
};
constexpr DTypeInfo kDTypes[] = {
    {DType::F32, "F32", 4}, {DType::F16, "F16", 2}, {DType::BF16, "BF16", 2},
    {DType::U8, "U8", 1},   {DType::I8, "I8", 1},   {DType::I16, "I16", 2},
    {DType::I32, "I32", 4}, {DType::I64, "I64", 8}, {DType::BOOL, "BOOL", 1},
};

bool parse_dtype(const std::string& name, DType* out) {
  for (const auto& info : kDTypes)
    if (name == info.name) {
      *out = info.dtype;
      return true;
    }
  return false;
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << '[';
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << (shape[i] < 0 ? std::string("*") : std::to_string(shape[i]));
  out << ']';
  return out.str();
}

template <typename T>
constexpr bool dtype_holds(DType d) {
  if constexpr (std::is_same_v<T, float>) return d == DType::F32;
  if constexpr (std::is_same_v<T, uint8_t>) return d == DType::U8 || d == DType::BOOL;
  if constexpr (std::is_same_v<T, int8_t>) return d == DType::I8;
  if constexpr (std::is_same_v<T, int16_t>) return d == DType::I16;
  if constexpr (std::is_same_v<T, uint16_t>) return d == DType::BF16 || d == DType::F16 || d == DType::I16;
  if constexpr (std::is_same_v<T, int32_t>) return d == DType::I32;
  if constexpr (std::is_same_v<T, int64_t>) return d == DType::I64;
  return false;
}

}  // namespace

const char* dtype_name(DType dtype) {
  for (const auto& info : kDTypes)
    if (info.dtype == dtype) return info.name;
  return "?";
}

size_t dtype_size(DType dtype) {
  for (const auto& info : kDTypes)
    if (info.dtype == dtype) return info.size;
  return 0;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

template <typename T>
std::span<const T> TensorView::as() const {
  if (!dtype_holds<T>(dtype)) fail("tensor ", name, ": unexpected dtype ", dtype_name(dtype));
  return {reinterpret_cast<const T*>(bytes.data()), bytes.size() / sizeof(T)};
}
template std::span<const float> TensorView::as<float>() const;
template std::span<const uint8_t> TensorView::as<uint8_t>() const;
template std::span<const int8_t> TensorView::as<int8_t>() const;
template std::span<const int16_t> TensorView::as<int16_t>() const;
template std::span<const uint16_t> TensorView::as<uint16_t>() const;
template std::span<const int32_t> TensorView::as<int32_t>() const;
template std::span<const int64_t> TensorView::as<int64_t>() const;

float bf16_bits_to_float(uint16_t bits) {
  uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &wide, 4);
  return out;
}

float f16_bits_to_float(uint16_t bits) {
  const uint32_t sign = (bits & 0x8000u) << 16;
  uint32_t exponent = (bits >> 10) & 0x1f, mantissa = bits & 0x3ff, wide;
  if (exponent == 0x1f) {
    wide = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent == 0) {
    if (mantissa == 0) {
      wide = sign;
    } else {  // subnormal: normalise into float32's range
      int shift = 0;
      while (!(mantissa & 0x400)) mantissa <<= 1, ++shift;
      wide = sign | ((127 - 15 + 1 - shift) << 23) | ((mantissa & 0x3ff) << 13);
    }
  } else {
    wide = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
  }
  float out;
  std::memcpy(&out, &wide, 4);
  return out;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(map_, map_size_);
}

SafetensorsFile::SafetensorsFile(SafetensorsFile&& other) noexcept { *this = std::move(other); }

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& other) noexcept {
  if (this != &other) {
    if (map_) ::munmap(map_, map_size_);
    path_ = std::move(other.path_);
    map_ = std::exchange(other.map_, nullptr);
    map_size_ = std::exchange(other.map_size_, 0);
    tensors_ = std::move(other.tensors_);
  }
  return *this;
}

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  SafetensorsFile file;
  file.path_ = path;
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) fail(path, ": cannot open (", std::strerror(errno), ")");
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, ": not a regular file");
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    fail(path, ": truncated: ", size, " bytes, expected at least the 8-byte header length");
  }
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) fail(path, ": cannot map (", std::strerror(errno), ")");
  file.map_ = map;
  file.map_size_ = size;
  const auto* base = static_cast<const std::byte*>(map);

  uint64_t header_len;
  std::memcpy(&header_len, base, 8);
  if (header_len > size - 8)
    fail(path, ": header length ", header_len, " runs past the end of the file (", size - 8, " bytes follow it)");
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(reinterpret_cast<const char*>(base) + 8,
                                   reinterpret_cast<const char*>(base) + 8 + header_len);
  } catch (const nlohmann::json::exception&) {
    fail(path, ": header is not valid JSON");
  }
  if (!header.is_object()) fail(path, ": header is not a JSON object");

  const std::byte* data = base + 8 + header_len;
  const uint64_t data_size = size - 8 - header_len;
  struct Span {
    uint64_t begin, end;
    std::string name;
  };
  std::vector<Span> spans;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") continue;
    const std::string where = path + ": tensor '" + name + "'";
    if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") || !entry.contains("data_offsets"))
      fail(where, ": expected an object with dtype, shape and data_offsets");
    TensorView view;
    view.name = name;
    if (!entry["dtype"].is_string() || !parse_dtype(entry["dtype"].get<std::string>(), &view.dtype))
      fail(where, ": unknown dtype ", entry["dtype"].dump(), ", expected one of F32 F16 BF16 U8 I8 I16 I32 I64 BOOL");
    const auto& shape = entry["shape"];
    if (!shape.is_array()) fail(where, ": shape is not an array");
    uint64_t numel = 1;
    for (const auto& d : shape) {
      if (!d.is_number_unsigned()) fail(where, ": shape entries must be non-negative integers");
      const uint64_t dim = d.get<uint64_t>();
      if (dim != 0 && numel > (uint64_t{1} << 62) / dim) fail(where, ": shape is too large");
      numel *= dim;
      view.shape.push_back(static_cast<int64_t>(dim));
    }
    const auto& offsets = entry["data_offsets"];
    if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() || !offsets[1].is_number_unsigned())
      fail(where, ": data_offsets must be two non-negative integers");
    const uint64_t begin = offsets[0].get<uint64_t>(), end = offsets[1].get<uint64_t>();
    if (begin > end || end > data_size)
      fail(where, ": data_offsets [", begin, ", ", end, "] out of range, the data section holds ", data_size, " bytes");
    if (numel * dtype_size(view.dtype) != end - begin)
      fail(where, ": shape ", shape_string(view.shape), " x ", dtype_name(view.dtype), " needs ",
           numel * dtype_size(view.dtype), " bytes but data_offsets span ", end - begin);
    view.bytes = {data + begin, static_cast<size_t>(end - begin)};
    spans.push_back({begin, end, name});
    file.tensors_.emplace(name, std::move(view));
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < spans.size(); ++i)
    if (spans[i].begin < spans[i - 1].end)
      fail(path, ": tensors '", spans[i - 1].name, "' and '", spans[i].name, "' overlap in the data section");
  return file;
}

bool SafetensorsFile::contains(const std::string& name) const { return tensors_.count(name) != 0; }

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  for (const auto& [name, view] : tensors_) out.push_back(name);
  return out;
}

const TensorView& SafetensorsFile::tensor(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) fail(path_, ": missing tensor '", name, "'");
  return it->second;
}

const TensorView& SafetensorsFile::expect(const std::string& name, std::initializer_list<DType> dtypes,
                                          std::vector<int64_t> shape) const {
  const TensorView& view = tensor(name);
  if (std::find(dtypes.begin(), dtypes.end(), view.dtype) == dtypes.end()) {
    std::string wanted;
    for (DType d : dtypes) wanted += std::string(wanted.empty() ? "" : " or ") + dtype_name(d);
    fail(path_, ": tensor '", name, "' has dtype ", dtype_name(view.dtype), ", expected ", wanted);
  }
  bool ok = view.shape.size() == shape.size();
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = shape[i] < 0 || shape[i] == view.shape[i];
  if (!ok) fail(path_, ": tensor '", name, "' has shape ", shape_string(view.shape), ", expected ", shape_string(shape));
  return view;
}

std::vector<float> SafetensorsFile::read_f32(const std::string& name) const {
  const TensorView& view = tensor(name);
  std::vector<float> out(view.numel());
  switch (view.dtype) {
    case DType::F32:
      std::memcpy(out.data(), view.bytes.data(), view.bytes.size());
      break;
    case DType::BF16: {
      auto bits = view.as<uint16_t>();
      for (size_t i = 0; i < out.size(); ++i) out[i] = bf16_bits_to_float(bits[i]);
      break;
    }
    case DType::F16: {
      auto bits = view.as<uint16_t>();
      for (size_t i = 0; i < out.size(); ++i) out[i] = f16_bits_to_float(bits[i]);
      break;
    }
    default:
      fail(path_, ": tensor '", name, "' has dtype ", dtype_name(view.dtype), ", expected F32, BF16 or F16");
  }
  return out;
}

std::vector<int64_t> SafetensorsFile::read_i64(const std::string& name) const {
  const TensorView& view = tensor(name);
  if (view.dtype != DType::I64) fail(path_, ": tensor '", name, "' has dtype ", dtype_name(view.dtype), ", expected I64");
  auto values = view.as<int64_t>();
  return {values.begin(), values.end()};
}

void SafetensorsWriter::add(const std::string& name, DType dtype, std::vector<int64_t> shape,
                            std::span<const std::byte> bytes) {
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  if (static_cast<size_t>(numel) * dtype_size(dtype) != bytes.size())
    fail("safetensors writer: tensor '", name, "' shape ", shape_string(shape), " does not match ", bytes.size(), " bytes");
  entries_[name] = Entry{dtype, std::move(shape), {bytes.begin(), bytes.end()}};
}

void SafetensorsWriter::add_f32(const std::string& name, std::vector<int64_t> shape, std::span<const float> values) {
  add(name, DType::F32, std::move(shape), std::as_bytes(values));
}
void SafetensorsWriter::add_u8(const std::string& name, std::vector<int64_t> shape, std::span<const uint8_t> values) {
  add(name, DType::U8, std::move(shape), std::as_bytes(values));
}
void SafetensorsWriter::add_i64(const std::string& name, std::vector<int64_t> shape, std::span<const int64_t> values) {
  add(name, DType::I64, std::move(shape), std::as_bytes(values));
}
void SafetensorsWriter::add_bf16_bits(const std::string& name, std::vector<int64_t> shape, std::span<const uint16_t> bits) {
  add(name, DType::BF16, std::move(shape), std::as_bytes(bits));
}

void SafetensorsWriter::write(const std::string& path) const {
  nlohmann::json header = nlohmann::json::object();
  uint64_t offset = 0;
  for (const auto& [name, entry] : entries_) {
    header[name] = {{"dtype", dtype_name(entry.dtype)}, {"shape", entry.shape},
                    {"data_offsets", {offset, offset + entry.bytes.size()}}};
    offset += entry.bytes.size();
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // keep the data 8-byte aligned
  write_file_atomically(path, [&](std::ostream& out) {
    const uint64_t len = text.size();
    out.write(reinterpret_cast<const char*>(&len), 8);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    for (const auto& [name, entry] : entries_)
      out.write(reinterpret_cast<const char*>(entry.bytes.data()), static_cast<std::streamsize>(entry.bytes.size()));
  });
}

}  // namespace flashmem
