// Raw text in: the corpus files named on the command line (directories walked), read whole
// (gzip and dictd's .dz decompressed), checked to be UTF-8, and cut into documents.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace nibble::data {

// How a file's text becomes documents (each document is preceded by the end-of-text token).
enum class DocumentSplit {
  file,       // the whole file is one document
  paragraph,  // blank lines separate documents
  line,       // every non-empty line is a document
  jsonl,      // one JSON object per line; its string field (default "text") is the document
};
DocumentSplit parse_document_split(const std::string& name);  // throws DataError
const char* document_split_name(DocumentSplit split);

struct InputFile {
  std::string path;
  bool named = false;  // named on the command line (not found by walking a directory)
};

// Files named are taken as they are; directories are walked recursively in sorted order, keeping
// the files whose name matches one of `include` (shell globs on the file name; empty: all files).
// Throws DataError for a path that does not exist, or when nothing is found.
std::vector<InputFile> list_inputs(const std::vector<std::string>& paths, const std::vector<std::string>& include);

// Reads one input (decompressing gzip) and checks it: an empty file or invalid UTF-8 is a
// DataError naming the file and the byte offset (in the decompressed text).
std::string read_input_text(const std::string& path);

// Appends the documents of `text` (read from `path`, named in errors) to `out`. Documents that
// are empty or only whitespace are dropped.
void split_documents(const std::string& path, const std::string& text, DocumentSplit split,
                     const std::string& jsonl_field, std::vector<std::string>& out);

}  // namespace nibble::data
