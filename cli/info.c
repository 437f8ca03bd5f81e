/* info.c: `polysample info`: the version, the backends and what AUTO picks. */
#include "cli_commands.h"
#include "cli_options.h"
#include "cli_util.h"
#include "polysample.h"

#include <stdio.h>
#include <stdlib.h>

static const char info_description[] =
    "Prints the library version, each backend (compiled in, available, device\n"
    "count, and why not when it is not), and which backend AUTO selects and why,\n"
    "honouring POLYSAMPLE_BACKEND.\n";

int cli_info(int argc, char **argv)
{
    psm_context_options options;
    psm_context *context = NULL;
    psm_status status;
    const char *environment_backend = getenv("POLYSAMPLE_BACKEND");
    const cli_command info_command = {
        .name = "info",
        .synopsis = "polysample info",
        .description = info_description,
    };
    int backend, parsed = cli_parse_options(&info_command, argc, argv);
    if (parsed != CLI_PARSE_OK)
        return parsed == CLI_PARSE_HELP ? CLI_EXIT_OK : CLI_EXIT_USAGE;

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
