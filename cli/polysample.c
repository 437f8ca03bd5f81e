/* polysample.c: the command-line tool's entry point and the `info` command. */
#include "cli_commands.h"
#include "cli_util.h"
#include "polysample.h"

#include <stdio.h>
#include <stdlib.h>
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

static const char info_usage[] =
    "usage: polysample info\n"
    "\n"
    "Prints the library version, each backend (compiled in, available, device\n"
    "count, and why not when it is not), and which backend AUTO selects and why,\n"
    "honouring POLYSAMPLE_BACKEND.\n";

static int cli_info(int argc, char **argv)
{
    psm_context_options options;
    psm_context *context = NULL;
    psm_status status;
    const char *environment_backend = getenv("POLYSAMPLE_BACKEND");
    int backend;
    int i;
    for (i = 0; i < argc; ++i) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            fputs(info_usage, stdout);
            return CLI_EXIT_OK;
        }
        cli_error("info", "unexpected argument '%s'\n%s", argv[i], info_usage);
        return CLI_EXIT_USAGE;
    }

    printf("polysample %s\n\n", psm_version_string());
    printf("%-8s %-9s %-10s %-8s %s\n", "backend", "compiled", "available", "devices", "details");
    for (backend = PSM_BACKEND_CPU; backend < PSM_BACKEND_COUNT; ++backend) {
        const char *reason = NULL;
        int compiled = psm_backend_compiled((psm_backend)backend);
        int available = compiled ? psm_backend_available((psm_backend)backend, &reason) : 0;
        int devices = compiled ? psm_backend_device_count((psm_backend)backend) : 0;
        printf("%-8s %-9s %-10s %-8d %s\n", psm_backend_name((psm_backend)backend),
               compiled ? "yes" : "no", available ? "yes" : "no", devices,
               !compiled ? "not compiled into this build" : (reason ? reason : ""));
    }

    printf("\nPOLYSAMPLE_BACKEND: %s\n",
           environment_backend && environment_backend[0] ? environment_backend : "(unset)");
    cli_context_options_init(&options);
    status = psm_context_create(&options, &context);
    if (status != PSM_OK) {
        printf("auto: no backend could be selected\n");
        fflush(stdout);
        cli_library_error("info", "psm_context_create(AUTO)", status);
        return CLI_EXIT_FAILURE;
    }
    printf("auto: %s on %s\n", psm_backend_name(psm_context_backend(context)),
           psm_context_device_name(context));
    printf("why:  %s\n", psm_context_selection_reason(context));
    psm_context_destroy(context);
    return CLI_EXIT_OK;
}

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
