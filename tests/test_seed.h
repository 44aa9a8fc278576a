// A fresh random seed per test, printed so that a failure can be reproduced:
// rerun with NIBBLE_TEST_SEED=<seed> to draw the very same inputs.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>

namespace nibble::test {

inline uint64_t fresh_seed() {
  uint64_t seed;
  if (const char* env = std::getenv("NIBBLE_TEST_SEED"); env != nullptr && *env != '\0') {
    seed = std::strtoull(env, nullptr, 10);
  } else {
    std::random_device rd;
    seed = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  }
  const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::printf("[ seed     ] %s.%s: NIBBLE_TEST_SEED=%llu\n", info ? info->test_suite_name() : "?",
              info ? info->name() : "?", static_cast<unsigned long long>(seed));
  if (info) ::testing::Test::RecordProperty("seed", std::to_string(seed));
  return seed;
}

}  // namespace nibble::test
