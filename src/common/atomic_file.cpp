#include "src/common/atomic_file.hpp"

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>

#include "src/common/error.hpp"

namespace flashmem {

void write_file_atomically(const std::string& path, const std::function<void(std::ostream&)>& write) {
  const std::string temp = path + ".tmp." + std::to_string(::getpid());
  try {
    {
      std::ofstream out(temp, std::ios::binary | std::ios::trunc);
      if (!out) fail(path, ": cannot open for writing");
      write(out);
      out.flush();
      if (!out) fail(path, ": write failed (disk full?)");
    }
    std::error_code ec;
    std::filesystem::rename(temp, path, ec);
    if (ec) fail(path, ": cannot rename temporary file into place: ", ec.message());
  } catch (...) {
    std::remove(temp.c_str());
    throw;
  }
}

}  // namespace flashmem
