/* cli_options.c: the subcommands' option parser and usage texts (see
 * cli_options.h). */
#define _POSIX_C_SOURCE 200809L
#include "cli_options.h"
#include "cli_util.h"

#include <stdio.h>
#include <string.h>

/* Lists are split in a copy of at most this many bytes. */
#define CLI_LIST_TEXT_MAX 256

#define CLI_BACKEND_ITEMS "auto, cpu, cuda, hip or opencl, each optionally :N"

/* Whether argument names the option: 1 as "--name", 2 as "--name=VALUE", 0
 * when it names another one. */
static int names_option(const char *argument, const cli_option *option)
{
    size_t length = strlen(option->name);
    if (strncmp(argument, option->name, length) != 0)
        return 0;
    if (argument[length] == '\0')
        return 1;
    return argument[length] == '=' ? 2 : 0;
}

/* Splits text at commas (empty items are skipped) and hands each item to
 * store(item, index, context). The item count, or -1 after a message. */
static int split_list(const cli_command *command, const cli_option *option, const char *text,
                      int (*store)(const char *item, int index, void *context), void *context)
{
    char buffer[CLI_LIST_TEXT_MAX];
    char *item, *save = NULL;
    uint64_t limit = option->maximum < CLI_LIST_CAPACITY ? option->maximum : CLI_LIST_CAPACITY;
    int count = 0;
    if (strlen(text) >= sizeof buffer) {
        cli_error(command->name, "%s list is too long (at most %d characters)", option->name,
                  CLI_LIST_TEXT_MAX - 1);
        return -1;
    }
    strcpy(buffer, text);
    for (item = strtok_r(buffer, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        if ((uint64_t)count == limit) {
            cli_error(command->name, "%s takes at most %llu item%s", option->name,
                      (unsigned long long)limit, limit == 1 ? "" : "s");
            return -1;
        }
        if (store(item, count, context) != 0) {
            cli_error(command->name, "bad %s item '%s' (%s)", option->name, item,
                      option->kind == CLI_OPTION_BACKEND_LIST ? CLI_BACKEND_ITEMS
                                                              : option->items);
            return -1;
        }
        ++count;
    }
    if (count == 0) {
        cli_error(command->name, "%s needs at least one item", option->name);
        return -1;
    }
    return count;
}

static int store_backend(const char *item, int index, void *context)
{
    cli_backend_list *list = context;
    return cli_parse_backend(item, &list->backends[index], &list->device_indices[index]);
}

typedef struct item_context {
    const cli_option *option;
    cli_item_list *list;
} item_context;

static int store_item(const char *item, int index, void *context)
{
    item_context *items = context;
    return items->option->parse_item(item, &items->list->values[index]);
}

/* "--name VALUE", "--name=VALUE" or "--name". */
static void option_label(const cli_option *option, char *label, size_t size)
{
    if (option->kind == CLI_OPTION_FLAG)
        snprintf(label, size, "%s", option->name);
    else
        snprintf(label, size, "%s%s%s", option->name, option->value_attached_only ? "=" : " ",
                 option->value_name ? option->value_name : "VALUE");
}

static int store_value(const cli_command *command, const cli_option *option, const char *value)
{
    char problem[128];
    switch (option->kind) {
    case CLI_OPTION_FLAG:
        *(int *)option->target = 1;
        return CLI_PARSE_OK;
    case CLI_OPTION_DECIMAL:
        return cli_option_decimal(command->name, option->name, value, option->minimum,
                                  option->maximum, (uint64_t *)option->target) == 0
                   ? CLI_PARSE_OK
                   : CLI_PARSE_ERROR;
    case CLI_OPTION_FLOAT:
        if (cli_parse_float(value, (float *)option->target, problem, sizeof problem) == 0)
            return CLI_PARSE_OK;
        cli_error(command->name, "bad %s '%s': %s", option->name, value, problem);
        return CLI_PARSE_ERROR;
    case CLI_OPTION_STRING:
        if (!value[0]) {
            char label[64];
            option_label(option, label, sizeof label);
            cli_error(command->name, "option %s needs a value", label);
            return CLI_PARSE_ERROR;
        }
        *(const char **)option->target = value;
        return CLI_PARSE_OK;
    case CLI_OPTION_BACKEND_LIST: {
        cli_backend_list parsed;
        int count = split_list(command, option, value, store_backend, &parsed);
        if (count < 0)
            return CLI_PARSE_ERROR;
        parsed.count = count;
        *(cli_backend_list *)option->target = parsed;
        return CLI_PARSE_OK;
    }
    case CLI_OPTION_LIST: {
        cli_item_list parsed;
        item_context context = {option, &parsed};
        int count = split_list(command, option, value, store_item, &context);
        if (count < 0)
            return CLI_PARSE_ERROR;
        parsed.count = count;
        *(cli_item_list *)option->target = parsed;
        return CLI_PARSE_OK;
    }
    }
    cli_error(command->name, "option %s has no kind the parser knows", option->name);
    return CLI_PARSE_ERROR;
}

int cli_parse_options(const cli_command *command, int argc, char **argv)
{
    unsigned char given[CLI_MAX_OPTIONS] = {0};
    int i;
    if (command->option_count > CLI_MAX_OPTIONS) {
        cli_error(command->name, "more options (%d) than the parser holds (%d)",
                  command->option_count, CLI_MAX_OPTIONS);
        return CLI_PARSE_ERROR;
    }
    if (command->positional)
        *command->positional = NULL;
    for (i = 0; i < argc; ++i) {
        const char *argument = argv[i];
        const cli_option *option = NULL;
        const char *value = NULL;
        const cli_option *named = NULL;
        int k, form = 0;
        if (!strcmp(argument, "--help") || !strcmp(argument, "-h")) {
            cli_print_usage(command, stdout);
            return CLI_PARSE_HELP;
        }
        if (argument[0] != '-' || argument[1] == '\0') {
            if (!command->positional) {
                cli_error(command->name, "unexpected argument '%s' (see polysample %s --help)",
                          argument, command->name);
                return CLI_PARSE_ERROR;
            }
            if (*command->positional) {
                cli_error(command->name, "more than one %s ('%s' and '%s')",
                          command->positional_name, *command->positional, argument);
                return CLI_PARSE_ERROR;
            }
            *command->positional = argument;
            continue;
        }
        /* Two entries may share a name: a flag and its "=VALUE" form. */
        for (k = 0; k < command->option_count && !option; ++k) {
            const cli_option *candidate = &command->options[k];
            int candidate_form = names_option(argument, candidate);
            if (!candidate_form)
                continue;
            named = candidate;
            form = candidate_form;
            if (form == 2 ? candidate->kind != CLI_OPTION_FLAG : !candidate->value_attached_only)
                option = candidate;
        }
        if (!option) {
            if (named && form == 2)
                cli_error(command->name, "option %s takes no value", named->name);
            else if (named)
                cli_error(command->name, "option %s needs a value: %s=%s", named->name,
                          named->name, named->value_name ? named->value_name : "VALUE");
            else
                cli_error(command->name, "unknown option '%s' (see polysample %s --help)",
                          argument, command->name);
            return CLI_PARSE_ERROR;
        }
        if (given[option - command->options]) {
            cli_error(command->name, "option %s%s is given more than once", option->name,
                      option->value_attached_only ? "=" : "");
            return CLI_PARSE_ERROR;
        }
        given[option - command->options] = 1;
        if (option->kind != CLI_OPTION_FLAG) {
            if (form == 2) {
                value = argument + strlen(option->name) + 1;
            } else if (i + 1 < argc) {
                value = argv[++i];
            } else {
                cli_error(command->name, "option %s needs a value", option->name);
                return CLI_PARSE_ERROR;
            }
        }
        if (store_value(command, option, value) != CLI_PARSE_OK)
            return CLI_PARSE_ERROR;
    }
    return CLI_PARSE_OK;
}

/* ---- usage ------------------------------------------------------------------- */

/* The default shown after the help, or "" for none. */
static void option_default(const cli_option *option, char *text, size_t size)
{
    text[0] = '\0';
    if (option->default_text) {
        if (option->default_text[0])
            snprintf(text, size, " (default %s)", option->default_text);
    } else if (option->kind == CLI_OPTION_DECIMAL) {
        snprintf(text, size, " (default %llu)",
                 (unsigned long long)*(const uint64_t *)option->target);
    } else if (option->kind == CLI_OPTION_FLOAT) {
        snprintf(text, size, " (default %g)", (double)*(const float *)option->target);
    }
}

/* One option: its label, then its help lines from column `column`; the
 * suffix (its default) ends the last line, or takes a line of its own where
 * it would pass CLI_USAGE_WIDTH. */
static void print_option(FILE *out, const char *label, const char *help, const char *suffix,
                         int column)
{
    const char *line = help;
    int first = 1;
    for (;;) {
        const char *end = strchr(line, '\n');
        int length = end ? (int)(end - line) : (int)strlen(line);
        if (first)
            fprintf(out, "  %-*s", column - 2, label);
        else
            fprintf(out, "%*s", column, "");
        fprintf(out, "%.*s", length, line);
        if (!end && suffix[0]) {
            if (column + length + (int)strlen(suffix) > CLI_USAGE_WIDTH)
                fprintf(out, "\n%*s%s", column, "", suffix + 1);
            else
                fputs(suffix, out);
        }
        fputc('\n', out);
        if (!end)
            break;
        line = end + 1;
        first = 0;
    }
}

void cli_print_usage(const cli_command *command, FILE *out)
{
    static const char help_label[] = "--help, -h";
    char label[64], suffix[96];
    int column = (int)sizeof help_label - 1, k, has_decimal = 0, has_float = 0;
    for (k = 0; k < command->option_count; ++k) {
        int length;
        option_label(&command->options[k], label, sizeof label);
        length = (int)strlen(label);
        if (length > column)
            column = length;
        has_decimal |= command->options[k].kind == CLI_OPTION_DECIMAL;
        has_float |= command->options[k].kind == CLI_OPTION_FLOAT;
    }
    column += 2 + 3; /* the indent and the gap */

    fprintf(out, "usage: %s\n", command->synopsis);
    if (command->description)
        fprintf(out, "\n%s", command->description);
    fputs("\noptions:\n", out);
    for (k = 0; k < command->option_count; ++k) {
        option_label(&command->options[k], label, sizeof label);
        option_default(&command->options[k], suffix, sizeof suffix);
        print_option(out, label, command->options[k].help, suffix, column);
    }
    print_option(out, help_label, "this text", "", column);
    if (has_decimal || has_float || command->notes)
        fputc('\n', out);
    if (has_decimal)
        fputs("Integers are decimal digits only: no sign, spaces or 0x prefix, and a\n"
              "leading zero is not octal (010 is ten).\n",
              out);
    if (has_float)
        fputs("Fractions are decimal: an optional sign, digits with an optional point and\n"
              "exponent (0.9, 5e-2); no spaces, hex, inf or nan.\n",
              out);
    if (command->notes)
        fputs(command->notes, out);
}
