/* cli_commands.h: the subcommands of the polysample tool. Each takes the
 * arguments after its name and returns the process exit status. */
#ifndef PSM_CLI_COMMANDS_H
#define PSM_CLI_COMMANDS_H

int cli_info(int argc, char **argv);
int cli_sample(int argc, char **argv);
int cli_bench(int argc, char **argv);
int cli_check(int argc, char **argv);

#endif /* PSM_CLI_COMMANDS_H */
