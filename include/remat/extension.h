// <remat/extension.h> for programs that use remat as a Meson subproject (the installed copy is the
// root extension.h itself, under include/remat/).
#pragma once

#include "../../extension.h"
