// The public entry points (and remat::dist's), compiled by the install test with -Wall -Wextra -Wpedantic -Werror
// (g++ and clang++) and only -I<prefix>/include: the installed headers must be clean.
#include <remat/dist/data_parallel.h>
#include <remat/dist/sharded_adamw.h>
#include <remat/extension.h>
#include <remat/remat.h>

int main() { return remat::version()[0] == REMAT_VERSION_STRING[0] ? 0 : 1; }
