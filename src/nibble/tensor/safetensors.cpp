#include "nibble/tensor/safetensors.h"

#include <algorithm>
#include <limits>
#include <set>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "nibble/tensor/atomic_file.h"

namespace nibble {
namespace {

constexpr int64_t kMaxHeaderBytes = 100'000'000;  // the safetensors library's limit
constexpr std::string_view kMetadataKey = "__metadata__";

int64_t le64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ? -1 : static_cast<int64_t>(v);
}

// A JSON value as a non-negative int64, or nullopt.
std::optional<int64_t> as_index(const nlohmann::json& v) {
  if (!v.is_number_unsigned()) return std::nullopt;
  const uint64_t u = v.get<uint64_t>();
  if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
  return static_cast<int64_t>(u);
}

}  // namespace

void SafetensorsReader::fail(const std::string& why) const {
  throw std::runtime_error(path_.string() + ": " + why);
}

SafetensorsReader::SafetensorsReader(std::filesystem::path path) : path_(std::move(path)) {
  in_.open(path_, std::ios::binary);
  if (!in_) fail("cannot open for reading");
  in_.seekg(0, std::ios::end);
  const int64_t file_size = in_.tellg();
  in_.seekg(0);
  if (file_size < 8)
    fail("not a safetensors file: " + std::to_string(file_size) + " bytes, less than the 8-byte header size");
  uint8_t size_bytes[8];
  in_.read(reinterpret_cast<char*>(size_bytes), 8);
  const int64_t header_size = le64(size_bytes);
  if (header_size < 0 || header_size > kMaxHeaderBytes)
    fail("header size " + std::to_string(static_cast<uint64_t>(le64(size_bytes))) +
         " is above the 100 MB limit: not a safetensors file, or a corrupt one");
  if (header_size > file_size - 8)
    fail("header size " + std::to_string(header_size) + " runs past the end of the file (" +
         std::to_string(file_size) + " bytes): truncated or not a safetensors file");
  std::string json(static_cast<size_t>(header_size), '\0');
  if (!in_.read(json.data(), header_size)) fail("read failed");
  data_start_ = 8 + header_size;
  parse_header(json);

  // The tensors must tile the data section exactly: no overlap, no gap, nothing past its end.
  const int64_t data_size = file_size - data_start_;
  std::stable_sort(entries_.begin(), entries_.end(), [](const SafetensorsEntry& a, const SafetensorsEntry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  int64_t expected_begin = 0;
  const SafetensorsEntry* previous = nullptr;
  for (const SafetensorsEntry& e : entries_) {
    if (e.end > data_size)
      fail("tensor '" + e.name + "' ends at data byte " + std::to_string(e.end) + ", past the end of the data (" +
           std::to_string(data_size) + " bytes): the file is truncated or its offsets are wrong");
    if (e.begin < expected_begin)
      fail("tensors '" + previous->name + "' and '" + e.name + "' overlap (data_offsets [" +
           std::to_string(previous->begin) + ", " + std::to_string(previous->end) + "] and [" +
           std::to_string(e.begin) + ", " + std::to_string(e.end) + "])");
    if (e.begin > expected_begin)
      fail("gap of " + std::to_string(e.begin - expected_begin) + " unused bytes before tensor '" + e.name +
           "' (data_offsets must tile the data section)");
    expected_begin = e.end;
    previous = &e;
  }
  if (expected_begin != data_size)
    fail("the data section holds " + std::to_string(data_size) + " bytes but the tensors cover " +
         std::to_string(expected_begin) + " (trailing bytes after the last tensor)");
}

void SafetensorsReader::parse_header(std::string_view text) {
  // Top-level duplicate keys would be silently merged by the JSON parser: catch them on the way.
  std::set<std::string> seen;
  std::string duplicate;
  const nlohmann::json::parser_callback_t check_keys = [&](int depth, nlohmann::json::parse_event_t event,
                                                           nlohmann::json& parsed) {
    if (depth == 1 && event == nlohmann::json::parse_event_t::key && !seen.insert(parsed.get<std::string>()).second &&
        duplicate.empty())
      duplicate = parsed.get<std::string>();
    return true;
  };
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(text.begin(), text.end(), check_keys);
  } catch (const nlohmann::json::parse_error& e) {
    fail(std::string("the header is not valid JSON: ") + e.what());
  }
  if (!header.is_object()) fail("the header is not a JSON object");
  if (!duplicate.empty()) fail("'" + duplicate + "' appears twice in the header");

  for (const auto& [name, value] : header.items()) {
    if (name == kMetadataKey) {
      if (!value.is_object()) fail("__metadata__ must be an object of strings");
      for (const auto& [key, v] : value.items()) {
        if (!v.is_string()) fail("__metadata__['" + key + "'] is not a string");
        metadata_[key] = v.get<std::string>();
      }
      continue;
    }
    const std::string where = "tensor '" + name + "': ";
    if (!value.is_object()) fail(where + "its header entry is not an object");
    for (const auto& [key, v] : value.items()) {
      (void)v;
      if (key != "dtype" && key != "shape" && key != "data_offsets") fail(where + "unexpected field '" + key + "'");
    }
    if (!value.contains("dtype") || !value.contains("shape") || !value.contains("data_offsets"))
      fail(where + "needs 'dtype', 'shape' and 'data_offsets'");
    SafetensorsEntry e;
    e.name = name;
    const nlohmann::json& dt = value["dtype"];
    if (!dt.is_string()) fail(where + "'dtype' is not a string");
    const std::optional<DType> dtype = dtype_from_name(dt.get<std::string>());
    if (!dtype) fail(where + "unknown dtype '" + dt.get<std::string>() + "'");
    e.dtype = *dtype;
    const nlohmann::json& shape = value["shape"];
    if (!shape.is_array()) fail(where + "'shape' is not an array");
    for (const nlohmann::json& d : shape) {
      const std::optional<int64_t> dim = as_index(d);
      if (!dim) fail(where + "'shape' holds " + d.dump() + ", not a non-negative integer");
      e.shape.push_back(*dim);
    }
    const nlohmann::json& offsets = value["data_offsets"];
    if (!offsets.is_array() || offsets.size() != 2 || !as_index(offsets[0]) || !as_index(offsets[1]))
      fail(where + "'data_offsets' must be two non-negative integers [begin, end]");
    e.begin = *as_index(offsets[0]);
    e.end = *as_index(offsets[1]);
    if (e.end < e.begin) fail(where + "data_offsets " + offsets.dump() + " end before they begin");
    int64_t need;
    try {
      need = dtype_bytes(e.dtype, shape_numel(e.shape));
    } catch (const std::exception& ex) {
      fail(where + ex.what());
    }
    if (e.end - e.begin != need)
      fail(where + "data_offsets " + offsets.dump() + " hold " + std::to_string(e.end - e.begin) + " bytes, but " +
           std::string(dtype_name(e.dtype)) + " " + shape_string(e.shape) + " takes " + std::to_string(need));
    entries_.push_back(std::move(e));
  }
}

const SafetensorsEntry* SafetensorsReader::find(std::string_view name) const {
  for (const SafetensorsEntry& e : entries_)
    if (e.name == name) return &e;
  return nullptr;
}

HostTensor SafetensorsReader::read(std::string_view name) {
  const SafetensorsEntry* e = find(name);
  if (!e) fail("no tensor named '" + std::string(name) + "'");
  std::vector<uint8_t> bytes(static_cast<size_t>(e->end - e->begin));
  in_.clear();
  in_.seekg(data_start_ + e->begin);
  if (!in_.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(bytes.size())))
    fail("reading tensor '" + e->name + "' failed (was the file changed while being read?)");
  return HostTensor::raw(e->dtype, e->shape, std::move(bytes));
}

void write_safetensors(const std::filesystem::path& path, const std::vector<NamedTensor>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  const std::string file = path.string();
  std::vector<const NamedTensor*> order;
  std::set<std::string_view> names;
  for (const NamedTensor& t : tensors) {
    if (t.first.empty() || t.first == kMetadataKey)
      throw std::invalid_argument(file + ": invalid tensor name '" + t.first + "'");
    if (!names.insert(t.first).second) throw std::invalid_argument(file + ": tensor '" + t.first + "' given twice");
    if (static_cast<int64_t>(t.second.bytes.size()) != dtype_bytes(t.second.dtype, t.second.numel()))
      throw std::invalid_argument(file + ": tensor '" + t.first + "' has " + std::to_string(t.second.bytes.size()) +
                                  " bytes, which does not match " + std::string(dtype_name(t.second.dtype)) + " " +
                                  shape_string(t.second.shape));
    order.push_back(&t);
  }
  std::stable_sort(order.begin(), order.end(), [](const NamedTensor* a, const NamedTensor* b) {
    const int ba = dtype_bits(a->second.dtype), bb = dtype_bits(b->second.dtype);
    return ba != bb ? ba > bb : a->first < b->first;
  });

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header[std::string(kMetadataKey)] = metadata;
  int64_t offset = 0;
  for (const NamedTensor* t : order) {
    const int64_t end = offset + static_cast<int64_t>(t->second.bytes.size());
    header[t->first] = {{"dtype", dtype_name(t->second.dtype)}, {"shape", t->second.shape}, {"data_offsets", {offset, end}}};
    offset = end;
  }
  std::string json = header.dump();
  json.append((8 - json.size() % 8) % 8, ' ');  // data section starts 8-byte aligned

  uint8_t size_bytes[8];
  for (int i = 0; i < 8; ++i) size_bytes[i] = static_cast<uint8_t>(static_cast<uint64_t>(json.size()) >> (8 * i));
  AtomicFileWriter out(path);
  out.write(size_bytes, 8);
  out.write(json.data(), json.size());
  for (const NamedTensor* t : order) out.write(t->second.bytes);
  out.commit();
}

bool is_safetensors_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  char head[9];
  return in.read(head, 9) && head[8] == '{';
}

}  // namespace nibble
