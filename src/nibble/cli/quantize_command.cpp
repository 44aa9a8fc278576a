#include "nibble/cli/commands.h"
namespace nibble::cli {
void add_quantize_command(CLI::App& app) { app.add_subcommand("quantize", "(not yet written)"); }
}
