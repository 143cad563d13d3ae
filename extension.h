// remat's extension interface, for code that works below the public API: the tape (Graph, Node,
// saved slots, saved-tensor hooks), checkpoint regions, and the kernel interface a backend
// implements. Installed as <remat/extension.h>; these types change more often than remat.h's.
#pragma once

#include "remat.h"

#include "autograd/graph.h"
#include "autograd/node.h"
#include "checkpoint/region.h"
#include "kernels/backend.h"
#include "runtime/cuda_backend.h"
