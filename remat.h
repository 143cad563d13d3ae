// remat: include this one header for the runtime, the ops and the autograd engine.
#pragma once

#include "autograd/autocast.h"
#include "autograd/engine.h"
#include "autograd/grad_mode.h"
#include "autograd/ops.h"
#include "autograd/module.h"
#include "checkpoint/apply.h"
#include "checkpoint/checkpoint.h"
#include "checkpoint/planner.h"
#include "checkpoint/report.h"
#include "checkpoint/schedule.h"
#include "kernels/backend.h"
#include "kernels/op_list.h"
#include "runtime/allocator.h"
#include "runtime/random.h"
#include "runtime/tensor.h"
