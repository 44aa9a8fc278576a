#include "nibble/formats/minifloat.h"
#include <gtest/gtest.h>
namespace nibble { namespace {
TEST(Smoke, E2M1) { EXPECT_EQ(E2M1::encode(2.5f, Rounding::kNearestEven), 4); }
}}
