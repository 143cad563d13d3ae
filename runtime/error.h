// Errors: REMAT_CHECK for user errors (expected vs got), REMAT_ASSERT for internal invariants.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace remat {

// Every error remat raises. what() reads "<message> (at file:line)".
class Error : public std::runtime_error {
 public:
  Error(const std::string& message, const char* file, int line);
  // The message without the source location, for one-line CLI output.
  const std::string& message() const { return message_; }

 private:
  std::string message_;
};

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream out;
  ((out << args), ...);
  return out.str();
}
[[noreturn]] void throw_error(const char* file, int line, const std::string& message);
}  // namespace detail

}  // namespace remat

// The message is only built when the check fails.
#define REMAT_CHECK(cond, ...)                                                      \
  do {                                                                              \
    if (!(cond)) [[unlikely]]                                                       \
      ::remat::detail::throw_error(__FILE__, __LINE__, ::remat::detail::concat(__VA_ARGS__)); \
  } while (0)

#define REMAT_FAIL(...) ::remat::detail::throw_error(__FILE__, __LINE__, ::remat::detail::concat(__VA_ARGS__))

// An invariant of remat itself; failing means a bug in remat, not in the caller.
#define REMAT_ASSERT(cond, ...)                                                    \
  do {                                                                             \
    if (!(cond)) [[unlikely]]                                                      \
      ::remat::detail::throw_error(__FILE__, __LINE__,                             \
                                   ::remat::detail::concat("internal error: " #cond " failed. ", \
                                                           ##__VA_ARGS__));       \
  } while (0)
