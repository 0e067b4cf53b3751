// Writing output files so that a failure never leaves a partial file under the final name.
#pragma once
#include <functional>
#include <iosfwd>
#include <string>

namespace flashmem {

// Calls write(stream) on "<path>.tmp.<pid>", then renames it to path. On any error the temp
// file is removed and an Error naming path is thrown.
void write_file_atomically(const std::string& path, const std::function<void(std::ostream&)>& write);

}  // namespace flashmem
