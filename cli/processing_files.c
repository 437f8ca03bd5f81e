/* processing_files.c: see processing_files.h. */
#define _POSIX_C_SOURCE 200809L
#include "processing_files.h"

#include "cli_util.h"
#include "npy.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__)
__attribute__((format(printf, 3, 4)))
#endif
static int fail(char *error, size_t error_size, const char *format, ...)
{
    va_list arguments;
    va_start(arguments, format);
    vsnprintf(error, error_size, format, arguments);
    va_end(arguments);
    return -1;
}

/* ---- the allowed-token mask ------------------------------------------------ */

/* A bool mask (rows x vocab bytes, each 0 or 1) as rows x words words. */
static int pack_bools(const char *path, const uint8_t *bools, int64_t rows, int64_t vocab,
                      int64_t words_per_row, uint32_t *words, char *error, size_t error_size)
{
    int64_t row, token;
    memset(words, 0, (size_t)(rows * words_per_row) * sizeof *words);
    for (row = 0; row < rows; ++row)
        for (token = 0; token < vocab; ++token) {
            uint8_t value = bools[row * vocab + token];
            if (value > 1)
                return fail(error, error_size,
                            "'%s': row %lld, token %lld holds byte %u, which is not a bool "
                            "(0 or 1)",
                            path, (long long)row, (long long)token, (unsigned)value);
            words[row * words_per_row + token / 32] |= (uint32_t)value << (token % 32);
        }
    return 0;
}

int cli_read_allowed_mask(const char *path, int64_t rows, int64_t vocab, uint32_t **words,
                          int64_t *words_per_row, char *error, size_t error_size)
{
    cli_npy_array array;
    int64_t needed = (vocab + 31) / 32;
    *words = NULL;
    if (cli_npy_read_elements(path, CLI_NPY_MASK, &array, error, error_size) != 0)
        return -1;
    if (array.rows != rows) {
        cli_npy_free(&array);
        return fail(error, error_size, "'%s' has %lld mask row%s; the logits have %lld", path,
                    (long long)array.rows, array.rows == 1 ? "" : "s", (long long)rows);
    }
    if (array.element == CLI_NPY_U32) {
        if (array.vocab < needed) {
            cli_npy_free(&array);
            return fail(error, error_size,
                        "'%s' has %lld uint32 word%s a row; a row of %lld tokens needs at "
                        "least %lld (token i is bit i %% 32 of word i / 32)",
                        path, (long long)array.vocab, array.vocab == 1 ? "" : "s",
                        (long long)vocab, (long long)needed);
        }
        *words = array.data; /* the caller owns it now */
        *words_per_row = array.vocab;
        return 0;
    }
    if (array.vocab != vocab) {
        cli_npy_free(&array);
        return fail(error, error_size,
                    "'%s' has %lld bool%s a row; the logits have %lld tokens a row", path,
                    (long long)array.vocab, array.vocab == 1 ? "" : "s", (long long)vocab);
    }
    /* rows x needed words take no more bytes than the rows x vocab bools
     * already read, so the size cannot overflow. */
    *words = malloc((size_t)(rows * needed) * sizeof **words);
    if (!*words) {
        cli_npy_free(&array);
        return fail(error, error_size, "out of memory packing the mask of '%s'", path);
    }
    if (pack_bools(path, array.data, rows, vocab, needed, *words, error, error_size) != 0) {
        free(*words);
        *words = NULL;
        cli_npy_free(&array);
        return -1;
    }
    cli_npy_free(&array);
    *words_per_row = needed;
    return 0;
}

/* ---- text lists -------------------------------------------------------------- */

#define EVERY_ROW (-1)
#define WORD_SEPARATORS " \t\r\n\v\f"

/* One entry as the file gives it: a row (or EVERY_ROW), a token, a value. */
typedef struct list_entry {
    int64_t row;
    int32_t token;
    float value;
} list_entry;

typedef struct entry_buffer {
    list_entry *items;
    size_t count, capacity;
} entry_buffer;

static int push_entry(entry_buffer *buffer, list_entry entry)
{
    if (buffer->count == buffer->capacity) {
        size_t grown = buffer->capacity ? buffer->capacity * 2 : 256;
        list_entry *larger;
        if (grown > SIZE_MAX / sizeof *larger)
            return -1;
        larger = realloc(buffer->items, grown * sizeof *larger);
        if (!larger)
            return -1;
        buffer->items = larger;
        buffer->capacity = grown;
    }
    buffer->items[buffer->count++] = entry;
    return 0;
}

/* Where a bad word is: "<path>:<line>". */
typedef struct file_line {
    const char *path;
    long long line;
} file_line;

static int parse_row(const file_line *at, const char *word, int64_t rows, int64_t *row,
                     char *error, size_t error_size)
{
    char problem[128];
    uint64_t value;
    if (!strcmp(word, "*")) {
        *row = EVERY_ROW;
        return 0;
    }
    if (cli_parse_decimal(word, 0, UINT64_MAX, &value, problem, sizeof problem) != 0)
        return fail(error, error_size, "%s:%lld: bad row '%s': %s; '*' is every row", at->path,
                    at->line, word, problem);
    if (value >= (uint64_t)rows)
        return fail(error, error_size,
                    "%s:%lld: row %s is out of range: the logits have %lld row%s (0 to %lld)",
                    at->path, at->line, word, (long long)rows, rows == 1 ? "" : "s",
                    (long long)(rows - 1));
    *row = (int64_t)value;
    return 0;
}

static int parse_token(const file_line *at, const char *word, int64_t vocab, int32_t *token,
                       char *error, size_t error_size)
{
    char problem[128];
    uint64_t value;
    if (cli_parse_decimal(word, 0, UINT64_MAX, &value, problem, sizeof problem) != 0)
        return fail(error, error_size, "%s:%lld: bad token '%s': %s", at->path, at->line, word,
                    problem);
    if (value >= (uint64_t)vocab)
        return fail(error, error_size,
                    "%s:%lld: token %s is out of range: a row has %lld token%s (0 to %lld)",
                    at->path, at->line, word, (long long)vocab, vocab == 1 ? "" : "s",
                    (long long)(vocab - 1));
    *token = (int32_t)value; /* vocab is at most INT32_MAX */
    return 0;
}

/* One line's words (comment removed) into entries. */
static int parse_line(const file_line *at, char *line, int with_values, int64_t rows,
                      int64_t vocab, entry_buffer *entries, char *error, size_t error_size)
{
    char *words[4], *word, *save = NULL, problem[128];
    int count = 0;
    list_entry entry = {0, 0, 0.0f};
    char *comment = strchr(line, '#');
    if (comment)
        *comment = '\0';
    word = strtok_r(line, WORD_SEPARATORS, &save);
    if (!word)
        return 0; /* blank */
    if (parse_row(at, word, rows, &entry.row, error, error_size) != 0)
        return -1;
    if (!with_values) {
        int any = 0;
        while ((word = strtok_r(NULL, WORD_SEPARATORS, &save)) != NULL) {
            if (parse_token(at, word, vocab, &entry.token, error, error_size) != 0)
                return -1;
            if (push_entry(entries, entry) != 0)
                return fail(error, error_size, "%s:%lld: out of memory", at->path, at->line);
            any = 1;
        }
        if (!any)
            return fail(error, error_size,
                        "%s:%lld: a row without tokens; expected ROW TOKEN [TOKEN ...]",
                        at->path, at->line);
        return 0;
    }
    words[count++] = word;
    while (count < 4 && (word = strtok_r(NULL, WORD_SEPARATORS, &save)) != NULL)
        words[count++] = word;
    if (count != 3)
        return fail(error, error_size, "%s:%lld: expected ROW TOKEN VALUE; found %s", at->path,
                    at->line, count == 1 ? "only a row" : count == 2 ? "only 2 words"
                                                                     : "more than 3 words");
    if (parse_token(at, words[1], vocab, &entry.token, error, error_size) != 0)
        return -1;
    if (cli_parse_float(words[2], &entry.value, problem, sizeof problem) != 0)
        return fail(error, error_size, "%s:%lld: bad value '%s': %s", at->path, at->line,
                    words[2], problem);
    if (push_entry(entries, entry) != 0)
        return fail(error, error_size, "%s:%lld: out of memory", at->path, at->line);
    return 0;
}

/* The entries, in file order, as per-row lists. */
static int build_lists(const char *path, const entry_buffer *entries, int64_t rows,
                       int with_values, cli_row_lists *lists, char *error, size_t error_size)
{
    uint64_t every_row = 0, total;
    int64_t *cursor;
    size_t e;
    int64_t row;
    lists->offsets = calloc((size_t)rows + 1, sizeof *lists->offsets);
    cursor = malloc((size_t)rows * sizeof *cursor);
    if (!lists->offsets || !cursor) {
        free(cursor);
        return fail(error, error_size, "out of memory for the lists of '%s'", path);
    }
    for (e = 0; e < entries->count; ++e) {
        if (entries->items[e].row == EVERY_ROW)
            ++every_row;
        else
            ++lists->offsets[entries->items[e].row + 1];
    }
    /* Each '*' entry is one entry of every row. */
    if (every_row && every_row > (uint64_t)INT64_MAX / 8 / (uint64_t)rows) {
        free(cursor);
        return fail(error, error_size, "'%s' lists too many entries for %lld rows", path,
                    (long long)rows);
    }
    total = (uint64_t)entries->count - every_row + every_row * (uint64_t)rows;
    if (total > SIZE_MAX / sizeof(float)) {
        free(cursor);
        return fail(error, error_size, "'%s' lists too many entries for %lld rows", path,
                    (long long)rows);
    }
    for (row = 0; row < rows; ++row)
        lists->offsets[row + 1] += lists->offsets[row] + (int64_t)every_row;
    lists->entries = lists->offsets[rows];
    lists->tokens = malloc((size_t)total * sizeof *lists->tokens + 1);
    if (with_values)
        lists->values = malloc((size_t)total * sizeof *lists->values + 1);
    if (!lists->tokens || (with_values && !lists->values)) {
        free(cursor);
        return fail(error, error_size, "out of memory for the %llu entries of '%s'",
                    (unsigned long long)total, path);
    }
    memcpy(cursor, lists->offsets, (size_t)rows * sizeof *cursor);
    for (e = 0; e < entries->count; ++e) {
        const list_entry *entry = &entries->items[e];
        int64_t first = entry->row == EVERY_ROW ? 0 : entry->row;
        int64_t last = entry->row == EVERY_ROW ? rows - 1 : entry->row;
        for (row = first; row <= last; ++row) {
            int64_t at = cursor[row]++;
            lists->tokens[at] = entry->token;
            if (with_values)
                lists->values[at] = entry->value;
        }
    }
    free(cursor);
    return 0;
}

static int read_lists(const char *path, int64_t rows, int64_t vocab, int with_values,
                      cli_row_lists *lists, char *error, size_t error_size)
{
    entry_buffer entries = {NULL, 0, 0};
    file_line at = {path, 0};
    char *line = NULL;
    size_t capacity = 0;
    ssize_t length;
    int result = 0;
    FILE *file;
    memset(lists, 0, sizeof *lists);
    file = fopen(path, "r");
    if (!file)
        return fail(error, error_size, "cannot open '%s': %s", path, strerror(errno));
    errno = 0;
    while (result == 0 && (length = getline(&line, &capacity, file)) >= 0) {
        ++at.line;
        if ((size_t)length != strlen(line))
            result = fail(error, error_size, "%s:%lld: a NUL byte; expected text", path,
                          at.line);
        else
            result = parse_line(&at, line, with_values, rows, vocab, &entries, error,
                                error_size);
        errno = 0;
    }
    if (result == 0 && ferror(file))
        result = fail(error, error_size, "cannot read '%s': %s", path,
                      errno ? strerror(errno) : "read error");
    else if (result == 0 && errno == ENOMEM)
        result = fail(error, error_size, "%s:%lld: out of memory reading a line", path,
                      at.line + 1);
    free(line);
    fclose(file);
    if (result == 0)
        result = build_lists(path, &entries, rows, with_values, lists, error, error_size);
    free(entries.items);
    if (result != 0)
        cli_row_lists_free(lists);
    return result;
}

int cli_read_bias_lists(const char *path, int64_t rows, int64_t vocab, cli_row_lists *lists,
                        char *error, size_t error_size)
{
    return read_lists(path, rows, vocab, 1, lists, error, error_size);
}

int cli_read_token_lists(const char *path, int64_t rows, int64_t vocab, cli_row_lists *lists,
                         char *error, size_t error_size)
{
    return read_lists(path, rows, vocab, 0, lists, error, error_size);
}

void cli_row_lists_free(cli_row_lists *lists)
{
    free(lists->offsets);
    free(lists->tokens);
    free(lists->values);
    memset(lists, 0, sizeof *lists);
}

void cli_attach_row_lists(psm_logit_processing *processing, const cli_row_lists *bias,
                          const cli_row_lists *history, const cli_row_lists *prompt)
{
    processing->bias_offsets = bias->offsets;
    processing->bias_tokens = bias->tokens;
    processing->bias_values = bias->values;
    processing->history_offsets = history->offsets;
    processing->history_tokens = history->tokens;
    processing->prompt_offsets = prompt->offsets;
    processing->prompt_tokens = prompt->tokens;
}
