// Subcommands of the `flashmem` program; each file registers one on the app.
#pragma once
#include <CLI/CLI.hpp>

namespace flashmem::cli {

void add_score_command(CLI::App& app);
void add_make_checkpoint_command(CLI::App& app);
void add_run_command(CLI::App& app);

}  // namespace flashmem::cli
