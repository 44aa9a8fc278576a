#include "nibble/cli/commands.h"
namespace nibble::cli {
void add_demo_command(CLI::App& app) { app.add_subcommand("demo", "(not yet written)"); }
}
