// libFuzzer target: the Megatron-LM indexed-dataset reader. The input's first two bytes give the
// length of the .idx part; the rest is the .bin part.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "nibble/data/error.h"
#include "nibble/data/token_formats.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace nibble::data;
  if (size < 2) return 0;
  std::size_t idx_size = std::min<std::size_t>(size - 2, data[0] | (std::size_t{data[1]} << 8));
  auto idx = std::as_bytes(std::span(data + 2, idx_size));
  auto bin = std::as_bytes(std::span(data + 2 + idx_size, size - 2 - idx_size));
  try {
    TokenFile f = TokenFile::parse_megatron("fuzz.bin", idx, bin);
    f.set_vocab_limit(size % 3 == 0 ? 0 : 1000);
    std::vector<std::uint32_t> out(static_cast<std::size_t>(std::min<std::uint64_t>(f.size(), 1 << 20)));
    f.read(0, out.size(), out.data());
    if (f.size() > 2) f.read(f.size() / 2, 2, out.data());  // a read that starts inside the stream
  } catch (const DataError&) {
  }
  return 0;
}
