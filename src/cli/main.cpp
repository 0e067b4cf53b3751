// flashmem: lookahead sparse attention lab. Errors print one line and exit non-zero.
#include <cstdio>
#include <exception>

#include "src/cli/commands.hpp"
#include "src/common/error.hpp"

int main(int argc, char** argv) {
  CLI::App app{"flashmem: the FlashMemory lookahead retriever, a sparse decode loop and its costs"};
  app.require_subcommand(1);
  flashmem::cli::add_score_command(app);
  flashmem::cli::add_make_checkpoint_command(app);
  flashmem::cli::add_run_command(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const flashmem::Error& e) {
    std::fprintf(stderr, "flashmem: error: %s\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "flashmem: error: out of host memory\n");
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "flashmem: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
