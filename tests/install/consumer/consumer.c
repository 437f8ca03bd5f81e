/* consumer.c: a program built against an installed polysample (by
 * tests/install/run.sh, once through find_package and once through
 * pkg-config). Greedy sampling of two rows on the CPU backend must give each
 * row's argmax; the header's version must be the library's. */
#include <polysample.h>

#include <stdio.h>

int main(void)
{
    if (psm_version_number() != PSM_VERSION_NUMBER) {
        fprintf(stderr, "consumer: header %d, library %d\n", PSM_VERSION_NUMBER,
                psm_version_number());
        return 1;
    }
    psm_context_options options;
    psm_context_options_init(&options);
    options.backend = PSM_BACKEND_CPU;
    psm_context *context = NULL;
    if (psm_context_create(&options, &context) != PSM_OK) {
        fprintf(stderr, "consumer: %s\n", psm_last_error());
        return 1;
    }
    float logits[2][5] = {{0.5f, 3.0f, -1.0f, 2.0f, 0.0f}, {1.0f, 0.0f, 0.0f, 0.0f, 4.0f}};
    psm_tensor tensor = {.data = logits, .dtype = PSM_DTYPE_F32, .memory = PSM_MEMORY_HOST,
                         .rows = 2, .vocab = 5};
    psm_params params;
    psm_params_init(&params);
    params.temperature = 0.0f;
    int32_t tokens[2] = {-2, -2};
    psm_status status = psm_sample(context, &tensor, &params,
                                   (psm_output){.data = tokens, .memory = PSM_MEMORY_HOST},
                                   (psm_output){0});
    psm_context_destroy(context);
    if (status != PSM_OK || tokens[0] != 1 || tokens[1] != 4) {
        fprintf(stderr, "consumer: status %s, tokens %d %d (expected 1 4)\n",
                psm_status_string(status), tokens[0], tokens[1]);
        return 1;
    }
    printf("consumer: polysample %s, tokens %d %d\n", psm_version_string(), tokens[0],
           tokens[1]);
    return 0;
}
