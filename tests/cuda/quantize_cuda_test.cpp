#include "nibble/quant/cuda/quantize_cuda.h"
#include <gtest/gtest.h>
