// <remat/remat.h> for programs that use remat as a Meson subproject (the installed copy is the
// root remat.h itself, under include/remat/).
#pragma once

#include "../../remat.h"
