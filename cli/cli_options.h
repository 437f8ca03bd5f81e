/*
 * cli_options.h: the one option parser of the polysample subcommands.
 *
 * Each subcommand describes its options in a table (cli_option): the name,
 * the kind of value, where the value goes, and the help text. One function
 * parses a command line against the table and one prints the usage text from
 * it, so that the options a command accepts and the options its --help lists
 * are the same list.
 *
 * Rules, the same for every subcommand:
 *  - an option with a value is written "--name VALUE" or "--name=VALUE"; the
 *    word after "--name" is its value whatever it looks like ("--seed -1" is
 *    a bad seed, not a missing one);
 *  - each option may be given once: a second one is refused, not an override;
 *  - "--help" or "-h" prints the usage on stdout and stops the parse;
 *  - anything else starting with '-' (and longer than "-") is an unknown
 *    option; other words are the command's positional argument, when it has
 *    one, or refused;
 *  - values are strict: integers as cli_parse_decimal, floats as
 *    cli_parse_float (cli_util.h), lists are comma-separated items.
 * Every refusal prints one "polysample <command>: ..." line on stderr.
 */
#ifndef PSM_CLI_OPTIONS_H
#define PSM_CLI_OPTIONS_H

#include "polysample.h"

#include <stdint.h>
#include <stdio.h>

typedef enum cli_option_kind {
    CLI_OPTION_FLAG,         /* no value; sets an int to 1 */
    CLI_OPTION_DECIMAL,      /* a uint64_t in [minimum, maximum] */
    CLI_OPTION_FLOAT,        /* a float */
    CLI_OPTION_STRING,       /* a non-empty const char *, pointing into argv */
    CLI_OPTION_BACKEND_LIST, /* a cli_backend_list of at most `maximum` backends */
    CLI_OPTION_LIST          /* a cli_item_list of at most `maximum` items, by parse_item */
} cli_option_kind;

#define CLI_LIST_CAPACITY 16

/* Backends as "auto", "cpu", "cuda", "hip" or "opencl", each optionally ":N"
 * for a device (device_indices[i] is -1 without one). */
typedef struct cli_backend_list {
    int count; /* 0: the option was not given */
    psm_backend backends[CLI_LIST_CAPACITY];
    int device_indices[CLI_LIST_CAPACITY];
} cli_backend_list;

typedef struct cli_item_list {
    int count; /* 0: the option was not given */
    int values[CLI_LIST_CAPACITY];
} cli_item_list;

typedef struct cli_option {
    const char *name;       /* "--top-k" */
    cli_option_kind kind;
    const char *value_name; /* "K" in the usage; NULL for a flag */
    void *target;           /* where the value goes; its type follows the kind */
    uint64_t minimum;       /* CLI_OPTION_DECIMAL only */
    uint64_t maximum;       /* CLI_OPTION_DECIMAL: the largest value; lists: the most items */
    /* CLI_OPTION_LIST: one item's value; 0 on success, -1 when it is not one. */
    int (*parse_item)(const char *item, int *value);
    /* Lists: the items accepted, for messages ("f32, f16 or bf16"). */
    const char *items;
    /* Lines separated by '\n', each short enough that the usage's lines
     * stay within CLI_USAGE_WIDTH. */
    const char *help;
    /* The "(default ...)" the usage adds after the help: NULL gives a decimal or
     * float option's value in its target before the parse, and nothing for the
     * other kinds; "" gives nothing (the help says it). */
    const char *default_text;
    /* The value is accepted only as "--name=VALUE" (bench's --json=PATH, whose
     * bare form is a flag of its own in the same table). */
    int value_attached_only;
} cli_option;

typedef struct cli_command {
    const char *name;        /* "sample" */
    const char *synopsis;    /* "polysample sample [options] LOGITS.npy" */
    const char *description; /* paragraphs before the options, each line ending '\n' */
    const cli_option *options;
    int option_count;
    const char *notes;       /* after the options (may be NULL) */
    /* The one positional argument the command takes ("input file"), or NULL. */
    const char *positional_name;
    const char **positional; /* where it goes */
} cli_command;

/* The usage texts' lines are at most this long (tests/test_cli.c checks). */
#define CLI_USAGE_WIDTH 79

/* The most options one command may have. */
#define CLI_MAX_OPTIONS 48

enum {
    CLI_PARSE_OK = 0,
    CLI_PARSE_HELP = 1,  /* --help: the usage went to stdout; exit 0 */
    CLI_PARSE_ERROR = -1 /* a message went to stderr; exit CLI_EXIT_USAGE */
};

/* Parses argv[0 .. argc - 1] (the words after the command's name). Targets
 * of options not given keep their values. */
int cli_parse_options(const cli_command *command, int argc, char **argv);

/* The usage text: synopsis, description, one line or more per option (and
 * --help), the rules for integers and floats when the command has such
 * options, then the notes. */
void cli_print_usage(const cli_command *command, FILE *out);

#endif /* PSM_CLI_OPTIONS_H */
