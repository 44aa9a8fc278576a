// NumPy .npy files (format versions 1.0, 2.0 and 3.0): a magic string, a version, a header that is
// a Python dict literal {'descr': ..., 'fortran_order': ..., 'shape': (...)}, then the raw array.
//
// Supported element types: '<f4' (F32), '|u1' (U8) and '<u2' (U16). NumPy has no bfloat16, so BF16
// travels as its raw bits in a '<u2' array: the writer stores BF16 that way, and the reader returns
// BF16 for '<u2' when asked to (NpyReadOptions::u16_as_bf16). Fortran order, big-endian data,
// structured and other dtypes are rejected. Errors are std::runtime_error naming the file.
#pragma once

#include <filesystem>

#include "nibble/tensor/host_tensor.h"

namespace nibble {

struct NpyReadOptions {
  bool u16_as_bf16 = false;  // read '<u2' arrays as BF16 bits
};

HostTensor read_npy(const std::filesystem::path& path, const NpyReadOptions& options = {});

// Writes F32, U8, U16 or BF16 (as '<u2'): version 1.0 (2.0 for headers too long for it), C order,
// through a temporary file renamed onto `path`.
void write_npy(const std::filesystem::path& path, const HostTensor& tensor);

// True if the file starts with the .npy magic string (false if it cannot be read).
bool is_npy_file(const std::filesystem::path& path);

}  // namespace nibble
