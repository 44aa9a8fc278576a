#include "nibble/data/utf8.h"

#include <gtest/gtest.h>

#include "test_util.h"

namespace nibble::data {
namespace {

TEST(Utf8, AcceptsValidText) {
  EXPECT_EQ(find_invalid_utf8(""), kValidUtf8);
  EXPECT_EQ(find_invalid_utf8("plain ASCII text, long enough for the 8-byte path"), kValidUtf8);
  EXPECT_EQ(find_invalid_utf8("caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac \xf0\x9f\x98\x80 \xf4\x8f\xbf\xbf"), kValidUtf8);
}

TEST(Utf8, FindsTheFirstBadByte) {
  EXPECT_EQ(find_invalid_utf8("abc\x80"), 3u);                 // stray continuation byte
  EXPECT_EQ(find_invalid_utf8("abcdefghij\xc3"), 10u);         // truncated sequence at the end
  EXPECT_EQ(find_invalid_utf8("\xc0\xaf"), 0u);                // overlong '/'
  EXPECT_EQ(find_invalid_utf8("ab\xe0\x80\xaf"), 2u);          // overlong 3-byte form
  EXPECT_EQ(find_invalid_utf8("\xed\xa0\x80"), 0u);            // surrogate U+D800
  EXPECT_EQ(find_invalid_utf8("x\xf4\x90\x80\x80"), 1u);       // above U+10FFFF
  EXPECT_EQ(find_invalid_utf8("The stock market\x92s drop"), 16u);  // Windows-1252 apostrophe (GCIDE has these)
  EXPECT_EQ(find_invalid_utf8("ok \xe6\x97 no"), 3u);          // sequence cut by a space
}

TEST(Utf8, RandomTextIsValidAndCorruptionsAreFound) {
  auto rng = std::mt19937_64(nibble::test::fresh_seed());
  for (int round = 0; round < 200; ++round) {
    std::string text = testing::random_text(rng, 1 + rng() % 200);
    ASSERT_EQ(find_invalid_utf8(text), kValidUtf8);
    // A lone continuation byte or 0xff at a character boundary is always invalid there.
    std::size_t at = rng() % (text.size() + 1);
    while (at < text.size() && (static_cast<unsigned char>(text[at]) & 0xc0) == 0x80) ++at;
    std::string bad = text;
    bad.insert(at, 1, (rng() & 1) ? '\x80' : '\xff');
    ASSERT_EQ(find_invalid_utf8(bad), at) << "round " << round;
  }
}

TEST(Utf8, ReplaceSubstitutesEachBadByte) {
  std::string text = "a\x92" "b\xff\xfe" "c\xc3\xa9";
  EXPECT_EQ(replace_invalid_utf8(text), 3u);
  EXPECT_EQ(text, "a\xef\xbf\xbd" "b\xef\xbf\xbd\xef\xbf\xbd" "c\xc3\xa9");
  EXPECT_EQ(find_invalid_utf8(text), kValidUtf8);
  std::string fine = "fine";
  EXPECT_EQ(replace_invalid_utf8(fine), 0u);
  EXPECT_EQ(fine, "fine");
}

}  // namespace
}  // namespace nibble::data
