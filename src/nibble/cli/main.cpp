// nibble: one program, one subcommand per task (see commands.h).
#include <cstdio>
#include <exception>

#include "nibble/cli/commands.h"

int main(int argc, char** argv) {
  CLI::App app{"nibble: pretrain language models in 4-bit floating point (NVFP4), with BF16, FP8 and MXFP4 beside it"};
  app.require_subcommand(1);
  nibble::cli::add_quantize_command(app);
  nibble::cli::add_demo_command(app);
  nibble::cli::add_prepare_command(app);
  nibble::cli::add_train_command(app);
  nibble::cli::add_compare_command(app);
  nibble::cli::add_quant_stats_command(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "nibble: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
