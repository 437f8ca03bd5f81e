/*
 * processing_files.h: the files that give `polysample sample` its logit
 * processing (psm_logit_processing), read into the library's layout.
 *
 * - An allowed-token mask: a .npy of uint32 words (rows x words, words >=
 *   ceil(vocab / 32); bit i % 32 of word i / 32 allows token i, as the
 *   library reads it) or of bools (rows x vocab; true allows the token).
 *   A 1-D array is one row.
 * - A logit bias: a text file of "ROW TOKEN VALUE" lines.
 * - A token list (history or prompt): a text file of "ROW TOKEN [TOKEN ...]"
 *   lines.
 * In the text files, words are separated by spaces or tabs, '#' starts a
 * comment that runs to the end of its line, and blank lines are skipped.
 * ROW is a row of the logits (decimal, from 0) or '*' for every row; a row
 * may have several lines, and its entries keep the order of the file (the
 * order in which bias entries of one token add). TOKEN is decimal, below the
 * vocab; VALUE a finite decimal fraction (cli_parse_float's rule).
 *
 * Every reader checks everything it reads against the logits' rows and vocab
 * and, on a bad file, fails with one message that names the file (and, for
 * text, the line) and says what is wrong; nothing is left allocated then.
 */
#ifndef PSM_CLI_PROCESSING_FILES_H
#define PSM_CLI_PROCESSING_FILES_H

#include "polysample.h"

#include <stddef.h>
#include <stdint.h>

/* Per-row lists in CSR form: row r's entries are [offsets[r], offsets[r + 1])
 * of tokens (and values, for a bias). */
typedef struct cli_row_lists {
    int64_t *offsets; /* rows + 1 entries */
    int32_t *tokens;
    float *values;    /* a bias's values; NULL for a token list */
    int64_t entries;  /* offsets[rows] */
} cli_row_lists;

/* The mask file at path for logits of rows x vocab: *words (owned; free())
 * holds rows x *words_per_row uint32 words. 0, or -1 with a message in
 * error. */
int cli_read_allowed_mask(const char *path, int64_t rows, int64_t vocab, uint32_t **words,
                          int64_t *words_per_row, char *error, size_t error_size);

/* A bias file ("ROW TOKEN VALUE" lines) into lists (values set). */
int cli_read_bias_lists(const char *path, int64_t rows, int64_t vocab, cli_row_lists *lists,
                        char *error, size_t error_size);

/* A token-list file ("ROW TOKEN [TOKEN ...]" lines) into lists. */
int cli_read_token_lists(const char *path, int64_t rows, int64_t vocab, cli_row_lists *lists,
                         char *error, size_t error_size);

void cli_row_lists_free(cli_row_lists *lists);

/* Points processing's bias, history and prompt arrays at the lists (a list
 * without offsets leaves its arrays NULL: no such list). */
void cli_attach_row_lists(psm_logit_processing *processing, const cli_row_lists *bias,
                          const cli_row_lists *history, const cli_row_lists *prompt);

#endif /* PSM_CLI_PROCESSING_FILES_H */
