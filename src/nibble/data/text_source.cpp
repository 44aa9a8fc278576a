#include "nibble/data/text_source.h"

#include <fnmatch.h>

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "nibble/data/error.h"
#include "nibble/data/file_io.h"
#include "nibble/data/utf8.h"

namespace nibble::data {

namespace fs = std::filesystem;

DocumentSplit parse_document_split(const std::string& name) {
  if (name == "file") return DocumentSplit::file;
  if (name == "paragraph") return DocumentSplit::paragraph;
  if (name == "line") return DocumentSplit::line;
  if (name == "jsonl") return DocumentSplit::jsonl;
  throw DataError("unknown document split '" + name + "' (expected file, paragraph, line or jsonl)");
}

const char* document_split_name(DocumentSplit split) {
  switch (split) {
    case DocumentSplit::file: return "file";
    case DocumentSplit::paragraph: return "paragraph";
    case DocumentSplit::line: return "line";
    case DocumentSplit::jsonl: return "jsonl";
  }
  return "?";
}

std::vector<InputFile> list_inputs(const std::vector<std::string>& paths, const std::vector<std::string>& include) {
  auto wanted = [&include](const fs::path& p) {
    if (include.empty()) return true;
    std::string name = p.filename().string();
    return std::any_of(include.begin(), include.end(),
                       [&name](const std::string& glob) { return ::fnmatch(glob.c_str(), name.c_str(), 0) == 0; });
  };
  std::vector<InputFile> out;
  for (const auto& path : paths) {
    std::error_code ec;
    auto status = fs::status(path, ec);
    if (ec || !fs::exists(status)) fail(path, "no such file or directory");
    if (fs::is_directory(status)) {
      std::vector<std::string> found;
      for (fs::recursive_directory_iterator it(path, fs::directory_options::follow_directory_symlink, ec), end;
           !ec && it != end; it.increment(ec)) {
        if (it->is_regular_file() && wanted(it->path())) found.push_back(it->path().string());
      }
      if (ec) fail(path, "cannot walk the directory: " + ec.message());
      std::sort(found.begin(), found.end());  // the same corpus gives the same shards on every machine
      if (found.empty()) fail(path, "the directory holds no file that matches --include");
      for (auto& f : found) out.push_back({std::move(f), false});
    } else {
      out.push_back({path, true});
    }
  }
  if (out.empty()) throw DataError("no input files");
  return out;
}

std::string read_input_text(const std::string& path) {
  std::string text = read_text_file(path);
  if (text.empty()) fail(path, "empty file");
  if (std::size_t bad = find_invalid_utf8(text); bad != kValidUtf8) {
    fail_at(path, bad, "invalid UTF-8 (offset in the decompressed text)");
  }
  return text;
}

namespace {

bool blank(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\f' || c == '\v'; });
}

void add(std::string_view doc, std::vector<std::string>& out) {
  if (!blank(doc)) out.emplace_back(doc);
}

}  // namespace

void split_documents(const std::string& path, const std::string& text, DocumentSplit split,
                     const std::string& jsonl_field, std::vector<std::string>& out) {
  std::string_view all(text);
  if (split == DocumentSplit::file) {
    add(all, out);
    return;
  }
  std::size_t start = 0;           // start of the current document (paragraph mode)
  std::size_t line_start = 0;
  while (line_start < all.size()) {
    std::size_t nl = all.find('\n', line_start);
    std::size_t line_end = nl == std::string_view::npos ? all.size() : nl;
    std::size_t next = nl == std::string_view::npos ? all.size() : nl + 1;
    std::string_view line = all.substr(line_start, line_end - line_start);
    switch (split) {
      case DocumentSplit::line:
        add(line, out);
        break;
      case DocumentSplit::paragraph:
        if (blank(line)) {
          add(all.substr(start, line_start - start), out);
          start = next;
        }
        break;
      case DocumentSplit::jsonl: {
        if (blank(line)) break;
        auto object = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
        if (object.is_discarded() || !object.is_object()) fail_at(path, line_start, "line is not a JSON object");
        auto field = object.find(jsonl_field);
        if (field == object.end() || !field->is_string()) {
          fail_at(path, line_start, "JSON object has no string field \"" + jsonl_field + "\"");
        }
        add(field->get_ref<const std::string&>(), out);
        break;
      }
      case DocumentSplit::file: break;
    }
    line_start = next;
  }
  if (split == DocumentSplit::paragraph && start < all.size()) add(all.substr(start), out);
}

}  // namespace nibble::data
