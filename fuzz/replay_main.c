/*
 * replay_main.c: runs a fuzz target over files, without libFuzzer, so that
 * the seed corpora and every crash reproducer (fuzz/corpus/<target>/) run
 * as ordinary ctest tests in every build, the sanitizer build included.
 * Arguments: files or directories (each regular file in them, sorted).
 */
#define _DEFAULT_SOURCE /* DT_REG */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv) __attribute__((weak));

static int replay_file(const char *path)
{
    FILE *file = fopen(path, "rb");
    if (!file) {
        fprintf(stderr, "replay: cannot open %s\n", path);
        return 1;
    }
    fseek(file, 0, SEEK_END);
    long size = ftell(file);
    fseek(file, 0, SEEK_SET);
    uint8_t *data = malloc(size > 0 ? (size_t)size : 1);
    if (!data || (size > 0 && fread(data, 1, (size_t)size, file) != (size_t)size)) {
        fprintf(stderr, "replay: cannot read %s\n", path);
        fclose(file);
        free(data);
        return 1;
    }
    fclose(file);
    LLVMFuzzerTestOneInput(data, (size_t)size);
    free(data);
    return 0;
}

static int by_name(const struct dirent **a, const struct dirent **b)
{
    return strcmp((*a)->d_name, (*b)->d_name);
}

int main(int argc, char **argv)
{
    if (LLVMFuzzerInitialize)
        LLVMFuzzerInitialize(&argc, &argv);
    int files = 0, failures = 0;
    for (int a = 1; a < argc; ++a) {
        struct stat info;
        if (stat(argv[a], &info) != 0) {
            fprintf(stderr, "replay: no such file or directory: %s\n", argv[a]);
            return 1;
        }
        if (!S_ISDIR(info.st_mode)) {
            failures += replay_file(argv[a]);
            ++files;
            continue;
        }
        struct dirent **entries = NULL;
        int count = scandir(argv[a], &entries, NULL, by_name);
        for (int e = 0; e < count; ++e) {
            char path[4096];
            snprintf(path, sizeof path, "%s/%s", argv[a], entries[e]->d_name);
            if (stat(path, &info) == 0 && S_ISREG(info.st_mode)) {
                failures += replay_file(path);
                ++files;
            }
            free(entries[e]);
        }
        free(entries);
    }
    printf("replayed %d file(s), %d unreadable\n", files, failures);
    return failures || files == 0 ? 1 : 0;
}
