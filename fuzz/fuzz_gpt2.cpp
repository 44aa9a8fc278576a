// libFuzzer target: GPT-2's tokenizer on arbitrary bytes. Invalid UTF-8 must be refused with a
// DataError; valid text must encode to ids that decode to exactly the same bytes, and encoding it
// in two pieces cut at a line start (as prepare does for large documents) must not change an id.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>

#include "nibble/data/error.h"
#include "nibble/data/gpt2_tokenizer.h"
#include "nibble/data/utf8.h"

namespace {
std::unique_ptr<nibble::data::Gpt2Tokenizer> tokenizer;
bool printable_ascii(char c) { return c > ' ' && c < 0x7f; }
}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const std::string dir = nibble::data::Gpt2Tokenizer::default_dir();
  tokenizer = std::make_unique<nibble::data::Gpt2Tokenizer>(dir + "/encoder.json", dir + "/vocab.bpe");
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace nibble::data;
  std::string_view text(reinterpret_cast<const char*>(data), size);
  if (find_invalid_utf8(text) != kValidUtf8) {
    try {
      (void)tokenizer->encode(text);
      std::abort();  // invalid UTF-8 was accepted
    } catch (const DataError&) {
    }
    return 0;
  }
  auto ids = tokenizer->encode(text);
  if (tokenizer->decode(ids) != text) std::abort();
  for (std::size_t cut = 1; cut + 1 < size; ++cut) {
    if (text[cut] == '\n' && printable_ascii(text[cut - 1]) && printable_ascii(text[cut + 1])) {
      auto pieces = tokenizer->encode(text.substr(0, cut + 1));
      tokenizer->encode(text.substr(cut + 1), pieces);
      if (pieces != ids) std::abort();
      break;
    }
  }
  return 0;
}
