// The Catch2 main shared by the CPU test binaries (compiled once).
#define CATCH_CONFIG_MAIN
#include <catch.hpp>
