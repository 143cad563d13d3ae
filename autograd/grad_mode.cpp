// Grad mode flag (per thread).
#include "autograd/grad_mode.h"
#include "autograd/trace.h"

namespace remat {

namespace {
thread_local bool t_grad_enabled = true;
}

bool grad_enabled() { return t_grad_enabled; }
NoGradGuard::NoGradGuard() : previous_(t_grad_enabled) { t_grad_enabled = false; }
NoGradGuard::~NoGradGuard() { t_grad_enabled = previous_; }
EnableGradGuard::EnableGradGuard() : previous_(t_grad_enabled) { t_grad_enabled = true; }
EnableGradGuard::~EnableGradGuard() { t_grad_enabled = previous_; }

namespace {
thread_local Tracer* t_tracer = nullptr;
}
Tracer* active_tracer() { return t_tracer; }
TracerScope::TracerScope(Tracer* tracer) : previous_(t_tracer) { t_tracer = tracer; }
TracerScope::~TracerScope() { t_tracer = previous_; }

}  // namespace remat
