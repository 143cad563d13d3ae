// remat, the public API: tensors and memory statistics, the ops and autograd, modules, activation
// checkpointing (regions, policies, planner, reports), nn layers and the reference models,
// optimizers, safetensors and the training loop. Installed as <remat/remat.h>; the tape and backend
// internals are in <remat/extension.h>.
#pragma once

#include "remat_version.h"

#include "runtime/allocator.h"
#include "runtime/cpu_allocator.h"
#include "runtime/cuda_devices.h"
#include "runtime/device.h"
#include "runtime/dtype.h"
#include "runtime/error.h"
#include "runtime/random.h"
#include "runtime/shape.h"
#include "runtime/tensor.h"

#include "kernels/op_list.h"

#include "autograd/autocast.h"
#include "autograd/engine.h"
#include "autograd/grad_mode.h"
#include "autograd/module.h"
#include "autograd/ops.h"
#include "autograd/trace.h"

#include "checkpoint/apply.h"
#include "checkpoint/checkpoint.h"
#include "checkpoint/counters.h"
#include "checkpoint/options.h"
#include "checkpoint/planner.h"
#include "checkpoint/policy.h"
#include "checkpoint/report.h"
#include "checkpoint/schedule.h"

#include "models/data.h"
#include "models/dit.h"
#include "models/gpt.h"
#include "models/images.h"
#include "models/nn/layers.h"
#include "models/optim.h"
#include "models/safetensors.h"
#include "models/sample.h"
#include "models/train.h"
#include "models/unet.h"
