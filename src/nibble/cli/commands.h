// The subcommands of the `nibble` program. Each lives in its own <name>_command.cpp and adds
// itself to the CLI11 app; main.cpp only lists them.
#pragma once

#include <CLI/CLI.hpp>

namespace nibble::cli {

void add_quantize_command(CLI::App& app);
void add_demo_command(CLI::App& app);
void add_prepare_command(CLI::App& app);
void add_train_command(CLI::App& app);
void add_compare_command(CLI::App& app);
void add_quant_stats_command(CLI::App& app);

}  // namespace nibble::cli
