#include "nibble/data/sampler.h"

#include <gtest/gtest.h>

#include <set>

#include "nibble/data/error.h"
#include "test_util.h"

namespace nibble::data {
namespace {

using Ids = std::vector<std::uint32_t>;
using testing::TempDir;

// Files of known content: token i of file f is f * 100000 + i, so a window tells where it came from.
TokenDataset make_dataset(const TempDir& dir, const std::vector<std::size_t>& sizes) {
  std::vector<std::string> paths;
  for (std::size_t f = 0; f < sizes.size(); ++f) {
    Ids tokens(sizes[f]);
    for (std::size_t i = 0; i < sizes[f]; ++i) tokens[i] = static_cast<std::uint32_t>(f * 100000 + i);
    paths.push_back(dir / ("shard_" + std::to_string(f) + ".bin"));
    write_llmc_file(paths.back(), tokens, 1000000);
  }
  return TokenDataset::open_files(paths, TokenFormat::llmc, 1000000);
}

TEST(WindowSampler, PermutationVisitsEveryWindowOnce) {
  TempDir dir;
  auto rng = std::mt19937_64(nibble::test::fresh_seed());
  for (std::size_t tokens : {2, 9, 100, 1000, 4097}) {
    TokenDataset data = make_dataset(dir, {tokens});
    WindowSampler sampler(data, /*window=*/2, /*stride=*/1, rng());
    std::set<std::uint64_t> seen;
    for (std::uint64_t i = 0; i < sampler.windows_per_epoch(); ++i) seen.insert(sampler.shuffled(0, i));
    EXPECT_EQ(seen.size(), sampler.windows_per_epoch());
    EXPECT_EQ(*seen.rbegin(), sampler.windows_per_epoch() - 1);
  }
}

TEST(WindowSampler, WindowsComeFromInsideOneFile) {
  TempDir dir;
  TokenDataset data = make_dataset(dir, {50, 17, 5, 33});  // the 5-token file holds no window
  const std::size_t T = 8;
  WindowSampler sampler(data, T + 1, T, 7);
  EXPECT_EQ(sampler.windows_per_epoch(), (50 - 1) / T + (17 - 1) / T + (33 - 1) / T);
  std::set<std::uint32_t> starts;
  Ids batch((T + 1) * sampler.windows_per_epoch());
  sampler.next(sampler.windows_per_epoch(), batch.data());
  for (std::size_t w = 0; w < sampler.windows_per_epoch(); ++w) {
    const std::uint32_t* x = batch.data() + w * (T + 1);
    EXPECT_EQ(x[0] % 100000 % T, 0u);  // windows start on multiples of the stride
    for (std::size_t i = 1; i <= T; ++i) ASSERT_EQ(x[i], x[0] + i);  // contiguous, same file
    starts.insert(x[0]);
  }
  EXPECT_EQ(starts.size(), sampler.windows_per_epoch());  // each window once per epoch
}

TEST(WindowSampler, ResumeContinuesExactly) {
  TempDir dir;
  auto rng = std::mt19937_64(nibble::test::fresh_seed());
  TokenDataset data = make_dataset(dir, {1000, 777});
  const std::uint64_t seed = rng();
  const std::size_t window = 17, batch = 5;
  WindowSampler reference(data, window, 16, seed);
  const std::size_t steps = 2 * reference.windows_per_epoch() / batch + 3;  // crosses epoch boundaries
  std::vector<Ids> expected(steps, Ids(window * batch));
  for (auto& b : expected) reference.next(batch, b.data());

  const std::size_t stop = 1 + rng() % (steps - 1);
  WindowSampler first(data, window, 16, seed);
  Ids b(window * batch);
  for (std::size_t s = 0; s < stop; ++s) first.next(batch, b.data());
  nlohmann::json saved = first.position().to_json();  // what a checkpoint stores

  WindowSampler resumed(data, window, 16, /*seed=*/0);  // the saved seed wins
  resumed.restore(SamplerPosition::from_json(saved));
  for (std::size_t s = stop; s < steps; ++s) {
    resumed.next(batch, b.data());
    ASSERT_EQ(b, expected[s]) << "step " << s << " after resuming at " << stop;
  }
}

TEST(WindowSampler, EpochsAndSeedsGiveDifferentOrders) {
  TempDir dir;
  TokenDataset data = make_dataset(dir, {3000});
  WindowSampler a(data, 11, 10, 1), b(data, 11, 10, 2);
  int same_seed_diff_epoch = 0, diff_seed = 0;
  for (std::uint64_t i = 0; i < a.windows_per_epoch(); ++i) {
    same_seed_diff_epoch += a.shuffled(0, i) != a.shuffled(1, i);
    diff_seed += a.shuffled(0, i) != b.shuffled(0, i);
  }
  EXPECT_GT(same_seed_diff_epoch, 200);
  EXPECT_GT(diff_seed, 200);
}

TEST(WindowSampler, RanksSplitTheGlobalBatch) {
  TempDir dir;
  TokenDataset data = make_dataset(dir, {2000});
  const std::size_t window = 9, per_rank = 3, world = 4;
  WindowSampler single(data, window, 8, 5);
  std::vector<WindowSampler> ranks;
  for (std::size_t r = 0; r < world; ++r) ranks.emplace_back(data, window, 8, 5);
  for (int step = 0; step < 30; ++step) {
    Ids global(window * per_rank * world);
    single.next(per_rank * world, global.data());
    for (unsigned r = 0; r < world; ++r) {
      Ids mine(window * per_rank);
      ranks[r].next_for_rank(per_rank, r, world, mine.data());
      ASSERT_TRUE(std::equal(mine.begin(), mine.end(), global.begin() + r * window * per_rank)) << "step " << step;
      ASSERT_EQ(ranks[r].position().index, single.position().index);
    }
  }
}

TEST(WindowSampler, RefusesDataWithoutWindowsAndForeignPositions) {
  TempDir dir;
  TokenDataset tiny = make_dataset(dir, {4});
  EXPECT_THROW(WindowSampler(tiny, 9, 8, 1), DataError);
  TokenDataset data = make_dataset(dir, {100});
  WindowSampler sampler(data, 9, 8, 1);
  SamplerPosition other = sampler.position();
  other.windows += 1;
  EXPECT_THROW(sampler.restore(other), DataError);
  EXPECT_THROW(SamplerPosition::from_json(nlohmann::json{{"seed", 1}}), DataError);
}

TEST(WindowSampler, VocabularyIsCheckedOnRead) {
  TempDir dir;
  write_llmc_file(dir / "s.bin", Ids{1, 2, 3, 4, 5, 900, 7, 8, 9}, 1000);
  TokenDataset data = TokenDataset::open_files({dir / "s.bin"}, std::nullopt, 500);
  WindowSampler sampler(data, 9, 8, 1);
  Ids out(9);
  EXPECT_THROW(sampler.next(1, out.data()), DataError);
}

}  // namespace
}  // namespace nibble::data
