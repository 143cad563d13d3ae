// Error construction, kept out of line so the check macros stay small.
#include "runtime/error.h"

namespace remat {

Error::Error(const std::string& message, const char* file, int line)
    : std::runtime_error(message + " (at " + file + ":" + std::to_string(line) + ")"),
      message_(message) {}

namespace detail {
void throw_error(const char* file, int line, const std::string& message) {
  // Keep only the path below the project root so messages stay short.
  std::string path(file);
  for (const char* root : {"runtime/", "kernels/", "autograd/", "checkpoint/", "models/", "bench/"}) {
    auto pos = path.rfind(root);
    if (pos != std::string::npos) {
      path = path.substr(pos);
      break;
    }
  }
  throw Error(message, path.c_str(), line);
}
}  // namespace detail

}  // namespace remat
