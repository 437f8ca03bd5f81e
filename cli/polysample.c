/* polysample.c: the command-line tool's entry point: picks the subcommand. */
#include "cli_commands.h"
#include "cli_util.h"
#include "polysample.h"

#include <stdio.h>
#include <string.h>

static const char main_usage[] =
    "usage: polysample <command> [options]\n"
    "\n"
    "Exact, cross-vendor token sampling from logits.\n"
    "\n"
    "commands:\n"
    "  info     version, backends (compiled in, available, devices) and what AUTO picks\n"
    "  sample   sample tokens from logits in a .npy file\n"
    "  bench    time sampling against a memory-read ceiling measured in the same run\n"
    "  check    verify that every backend, thread count and batch composition agrees\n"
    "\n"
    "`polysample <command> --help` describes a command's options.\n"
    "Environment: POLYSAMPLE_BACKEND=cpu|cuda|hip|opencl[:N] steers the AUTO choice.\n"
    "Exit status: 0 success, 1 failure (or a disagreement found by check), 2 usage error.\n";

int main(int argc, char **argv)
{
    const char *command;
    if (argc < 2) {
        fputs(main_usage, stderr);
        return CLI_EXIT_USAGE;
    }
    command = argv[1];
    if (!strcmp(command, "--help") || !strcmp(command, "-h") || !strcmp(command, "help")) {
        fputs(main_usage, stdout);
        return CLI_EXIT_OK;
    }
    if (!strcmp(command, "--version")) {
        printf("polysample %s\n", psm_version_string());
        return CLI_EXIT_OK;
    }
    if (!strcmp(command, "info"))
        return cli_info(argc - 2, argv + 2);
    if (!strcmp(command, "sample"))
        return cli_sample(argc - 2, argv + 2);
    if (!strcmp(command, "bench"))
        return cli_bench(argc - 2, argv + 2);
    if (!strcmp(command, "check"))
        return cli_check(argc - 2, argv + 2);
    cli_error(NULL, "unknown command '%s'\n%s", command, main_usage);
    return CLI_EXIT_USAGE;
}
