// libFuzzer target: the nanoGPT raw uint16 reader on arbitrary bytes.
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "nibble/data/error.h"
#include "nibble/data/token_formats.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace nibble::data;
  try {
    TokenFile f = TokenFile::parse_nanogpt("fuzz.bin", std::as_bytes(std::span(data, size)));
    f.set_vocab_limit(50257);
    std::vector<std::uint32_t> out(static_cast<std::size_t>(f.size()));
    f.read(0, out.size(), out.data());
  } catch (const DataError&) {
  }
  return 0;
}
