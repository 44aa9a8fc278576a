// Recipes: presets, overrides, validation, TOML in and out (toml++, used header-only).
#include "nibble/nn/recipe.h"

#include <charconv>
#include <cmath>
#include <fstream>
#include <sstream>
#include <toml++/toml.h>

namespace nibble::nn {

namespace {

constexpr std::array<const char*, kNumOperands> kOperandNames = {"fprop.x", "fprop.w", "dgrad.dy",
                                                                 "dgrad.w", "wgrad.dy", "wgrad.x"};

constexpr std::array<OperandFormat, 6> kAllFormats = {OperandFormat::kFp32,    OperandFormat::kBf16,
                                                      OperandFormat::kFp8E4M3, OperandFormat::kFp8E5M2,
                                                      OperandFormat::kMxfp4,   OperandFormat::kNvfp4};
constexpr std::array<Block, 4> kAllBlocks = {Block::kTensor, Block::k1x16, Block::k16x16, Block::k1x32};

[[noreturn]] void fail(std::string_view source, const std::string& message) {
  throw RecipeError(std::string(source) + ": " + message);
}

std::string trim(std::string_view s) {
  const auto b = s.find_first_not_of(" \t");
  if (b == std::string_view::npos) return {};
  const auto e = s.find_last_not_of(" \t");
  return std::string(s.substr(b, e - b + 1));
}

Block default_block(OperandFormat f) {
  switch (f) {
    case OperandFormat::kNvfp4: return Block::k1x16;
    case OperandFormat::kMxfp4: return Block::k1x32;
    default: return Block::kTensor;
  }
}

OperandRecipe operand(OperandFormat f, Block b, Rounding r = Rounding::kNearestEven, bool rht = false) {
  return OperandRecipe{f, b, r, rht};
}

Recipe uniform(std::string name, OperandRecipe op) {
  Recipe r;
  r.name = std::move(name);
  r.operands.fill(op);
  return r;
}

// The NVFP4 paper's layout of techniques, on a given 4-bit format.
Recipe fp4_recipe(std::string name, OperandFormat f, Block weight_block) {
  const Block b = default_block(f);
  Recipe r = uniform(std::move(name), operand(f, b));
  r[Operand::kFpropW] = operand(f, weight_block);
  r[Operand::kDgradW] = operand(f, weight_block);
  r[Operand::kDgradDy] = operand(f, b, Rounding::kStochastic);
  r[Operand::kWgradDy] = operand(f, b, Rounding::kStochastic, true);
  r[Operand::kWgradX] = operand(f, b, Rounding::kNearestEven, true);
  r.bf16_first_blocks = kBf16BlocksPaperRatio;
  r.bf16_last_blocks = kBf16BlocksPaperRatio;
  return r;
}


std::string list(const std::vector<std::string>& names) {
  std::string s;
  for (size_t i = 0; i < names.size(); ++i) s += (i ? ", " : "") + names[i];
  return s;
}

OperandFormat parse_format(std::string_view source, std::string_view key, std::string_view v) {
  std::vector<std::string> names;
  for (OperandFormat f : kAllFormats) {
    if (v == operand_format_name(f)) return f;
    names.push_back(operand_format_name(f));
  }
  fail(source, std::string(key) + ": unknown format '" + std::string(v) + "' (expected " + list(names) + ")");
}

Block parse_block(std::string_view source, std::string_view key, std::string_view v) {
  std::vector<std::string> names;
  for (Block b : kAllBlocks) {
    if (v == block_name(b)) return b;
    names.push_back(block_name(b));
  }
  fail(source, std::string(key) + ": unknown block shape '" + std::string(v) + "' (expected " + list(names) + ")");
}

Rounding parse_rounding(std::string_view source, std::string_view key, std::string_view v) {
  if (v == "rne") return Rounding::kNearestEven;
  if (v == "sr") return Rounding::kStochastic;
  fail(source, std::string(key) + ": unknown rounding '" + std::string(v) + "' (expected rne or sr)");
}

bool parse_bool(std::string_view source, std::string_view key, std::string_view v) {
  if (v == "true") return true;
  if (v == "false") return false;
  fail(source, std::string(key) + ": expected true or false, got '" + std::string(v) + "'");
}

template <typename T>
T parse_number(std::string_view source, std::string_view key, std::string_view v) {
  T out{};
  const auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), out);
  if (ec != std::errc() || end != v.data() + v.size() || v.empty())
    fail(source, std::string(key) + ": expected a number, got '" + std::string(v) + "'");
  return out;
}

std::string number_text(double v) {
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, r.ptr);
}

void apply_ablation(Recipe& r, std::string_view ablation) {
  for (OperandRecipe& op : r.operands) {
    if (ablation == "no_rht") op.rht = false;
    if (ablation == "no_2d" && op.block == Block::k16x16) op.block = Block::k1x16;
    if (ablation == "no_sr") op.rounding = Rounding::kNearestEven;
  }
  r.name += '+';
  r.name += ablation;
}

}  // namespace

const char* operand_name(Operand op) { return kOperandNames[static_cast<int>(op)]; }

bool operand_columnwise(Operand op) {
  return op == Operand::kDgradW || op == Operand::kWgradDy || op == Operand::kWgradX;
}

const char* operand_format_name(OperandFormat f) {
  switch (f) {
    case OperandFormat::kFp32: return "fp32";
    case OperandFormat::kBf16: return "bf16";
    case OperandFormat::kFp8E4M3: return "fp8_e4m3";
    case OperandFormat::kFp8E5M2: return "fp8_e5m2";
    case OperandFormat::kMxfp4: return "mxfp4";
    case OperandFormat::kNvfp4: return "nvfp4";
  }
  return "?";
}

Format quant_format(OperandFormat f) {
  switch (f) {
    case OperandFormat::kFp8E4M3: return Format::kFp8E4M3;
    case OperandFormat::kFp8E5M2: return Format::kFp8E5M2;
    case OperandFormat::kMxfp4: return Format::kMxfp4;
    case OperandFormat::kNvfp4: return Format::kNvfp4;
    default: throw std::invalid_argument(std::string(operand_format_name(f)) + " is not a quantized format");
  }
}

RhtSigns Recipe::rht_signs() const { return rht_sign_seed ? rht_signs_from_seed(*rht_sign_seed) : kDefaultRhtSigns; }

int Recipe::first_bf16_blocks(int num_blocks) const {
  return bf16_first_blocks >= 0 ? bf16_first_blocks : static_cast<int>(std::lround(num_blocks * 2.0 / 62.0));
}

int Recipe::last_bf16_blocks(int num_blocks) const {
  return bf16_last_blocks >= 0 ? bf16_last_blocks : static_cast<int>(std::lround(num_blocks * 8.0 / 62.0));
}

bool Recipe::keeps_bf16(int index, int num_blocks) const {
  return index < first_bf16_blocks(num_blocks) || index >= num_blocks - last_bf16_blocks(num_blocks);
}

std::vector<std::string> preset_names() { return {"fp32", "bf16", "fp8", "fp8_hybrid", "nvfp4", "mxfp4"}; }

Recipe preset(std::string_view name) {
  if (name == "fp32") return uniform("fp32", operand(OperandFormat::kFp32, Block::kTensor));
  if (name == "bf16") return uniform("bf16", operand(OperandFormat::kBf16, Block::kTensor));
  if (name == "fp8") return uniform("fp8", operand(OperandFormat::kFp8E4M3, Block::kTensor));
  if (name == "fp8_hybrid") {
    Recipe r = uniform("fp8_hybrid", operand(OperandFormat::kFp8E4M3, Block::kTensor));
    r[Operand::kDgradDy] = r[Operand::kWgradDy] = operand(OperandFormat::kFp8E5M2, Block::kTensor);
    return r;
  }
  if (name == "nvfp4") return fp4_recipe("nvfp4", OperandFormat::kNvfp4, Block::k16x16);
  if (name == "mxfp4") return fp4_recipe("mxfp4", OperandFormat::kMxfp4, Block::k1x32);
  throw RecipeError("unknown recipe '" + std::string(name) + "' (expected " + list(preset_names()) +
                    ", or a .toml file)");
}

void validate(const Recipe& r) {
  const std::string where = "recipe '" + r.name + "'";
  for (Operand op : kAllOperands) {
    const OperandRecipe& o = r[op];
    const std::string at = std::string(operand_name(op)) + ": ";
    const std::string fmt = operand_format_name(o.format);
    const std::string blk = block_name(o.block);
    switch (o.format) {
      case OperandFormat::kNvfp4:
        if (o.block != Block::k1x16 && o.block != Block::k16x16)
          fail(where, at + "nvfp4 takes 1x16 or 16x16 blocks, not " + blk);
        break;
      case OperandFormat::kMxfp4:
        if (o.block != Block::k1x32) fail(where, at + "mxfp4 takes 1x32 blocks, not " + blk);
        break;
      default:
        if (o.block != Block::kTensor) fail(where, at + fmt + " has no blocks (block must be 'tensor'), not " + blk);
    }
    if (o.rounding == Rounding::kStochastic && !o.quantized())
      fail(where, at + "stochastic rounding applies to quantized formats (fp8, mxfp4, nvfp4), not " + fmt);
    if (o.rht && op != Operand::kWgradDy && op != Operand::kWgradX)
      fail(where, at + "the RHT is applied only to the Wgrad inputs (wgrad.dy, wgrad.x), along the token dimension");
    if (o.rht && o.block == Block::k16x16)
      fail(where, at + "the RHT applies to 1D blocks along the reduction dimension, not to 16x16 tiles");
  }
  if (r[Operand::kWgradDy].rht != r[Operand::kWgradX].rht)
    fail(where, "wgrad.dy and wgrad.x must both use the RHT or neither (the transforms cancel only in pairs)");
  if (r.bf16_first_blocks < kBf16BlocksPaperRatio || r.bf16_last_blocks < kBf16BlocksPaperRatio)
    fail(where, "bf16_first_blocks and bf16_last_blocks must be >= 0 or \"auto\"");
  if (!(r.bf16_switch_fraction >= 0.0 && r.bf16_switch_fraction <= 1.0))
    fail(where, "bf16_switch_fraction must lie in [0, 1], got " + number_text(r.bf16_switch_fraction));
}

// "auto" (the paper's ratio) or a block count, as override text.
int parse_block_count(std::string_view source, std::string_view key, std::string_view value) {
  if (value == "auto") return kBf16BlocksPaperRatio;
  return parse_number<int>(source, key, value);
}

void apply_override(Recipe& r, std::string_view text, std::string_view source) {
  const std::string t = trim(text);
  const auto eq = t.find('=');
  if (eq == std::string::npos) {
    if (t == "no_rht" || t == "no_2d" || t == "no_sr") return apply_ablation(r, t);
    fail(source, "unknown override '" + t + "' (expected no_rht, no_2d, no_sr or key=value)");
  }
  const std::string key = trim(std::string_view(t).substr(0, eq));
  const std::string value = trim(std::string_view(t).substr(eq + 1));
  if (key == "name") {
    if (value.empty()) fail(source, "name must not be empty");
    r.name = value;
  } else if (key == "bf16_first_blocks") {
    r.bf16_first_blocks = parse_block_count(source, key, value);
  } else if (key == "bf16_last_blocks") {
    r.bf16_last_blocks = parse_block_count(source, key, value);
  } else if (key == "bf16_switch_fraction") {
    r.bf16_switch_fraction = parse_number<double>(source, key, value);
  } else if (key == "rht_sign_seed") {
    if (value == "default") r.rht_sign_seed.reset();
    else r.rht_sign_seed = parse_number<uint64_t>(source, key, value);
  } else {
    const auto dot = key.rfind('.');
    const std::string prefix = dot == std::string::npos ? "" : key.substr(0, dot);
    const std::string field = dot == std::string::npos ? key : key.substr(dot + 1);
    OperandRecipe* o = nullptr;
    for (Operand op : kAllOperands)
      if (prefix == operand_name(op)) o = &r[op];
    if (o == nullptr) fail(source, "unknown key '" + key + "'");
    if (field == "format") {
      o->format = parse_format(source, key, value);
      o->block = default_block(o->format);
      if (!o->quantized()) o->rounding = Rounding::kNearestEven;
    } else if (field == "block") {
      o->block = parse_block(source, key, value);
    } else if (field == "rounding") {
      o->rounding = parse_rounding(source, key, value);
    } else if (field == "rht") {
      o->rht = parse_bool(source, key, value);
    } else {
      fail(source, "unknown key '" + key + "' (an operand has format, block, rounding, rht)");
    }
  }
}

namespace {

std::string where(std::string_view source, const toml::node& node) {
  const auto& b = node.source().begin;
  return std::string(source) + ":" + std::to_string(b.line);
}

// A TOML scalar as override text, checking its type against what the key expects.
std::string scalar_text(std::string_view source, const std::string& key, const toml::node& n) {
  const std::string at = where(source, n);
  const std::string field = key.substr(key.rfind('.') + 1);
  const bool known = key.find('.') == std::string::npos
                         ? (key == "name" || key == "bf16_first_blocks" || key == "bf16_last_blocks" ||
                            key == "bf16_switch_fraction" || key == "rht_sign_seed")
                         : (field == "format" || field == "block" || field == "rounding" || field == "rht");
  if (!known) fail(at, "unknown key '" + key + "'");
  const bool wants_string = key == "name" || key == "base" || key.ends_with(".format") ||
                            key.ends_with(".block") || key.ends_with(".rounding");
  if (wants_string) {
    if (!n.is_string()) fail(at, key + " must be a string");
    return std::string(*n.value<std::string>());
  }
  if (key.ends_with(".rht")) {
    if (!n.is_boolean()) fail(at, key + " must be true or false");
    return *n.value<bool>() ? "true" : "false";
  }
  if (key == "bf16_switch_fraction") {
    if (!n.is_number()) fail(at, key + " must be a number");
    return number_text(*n.value<double>());
  }
  if (key == "rht_sign_seed" && n.is_string()) return std::string(*n.value<std::string>());
  if ((key == "bf16_first_blocks" || key == "bf16_last_blocks") && n.is_string())
    return std::string(*n.value<std::string>());
  if (!n.is_integer()) fail(at, key + " must be an integer");
  return std::to_string(*n.value<int64_t>());
}

}  // namespace

Recipe parse_recipe_toml(std::string_view text, std::string_view source) {
  toml::table doc;
  try {
    doc = toml::parse(text, source);
  } catch (const toml::parse_error& e) {
    fail(std::string(source) + ":" + std::to_string(e.source().begin.line), std::string(e.description()));
  }
  Recipe r;
  bool has_base = false;
  if (const toml::node* base = doc.get("base")) {
    if (!base->is_string()) fail(where(source, *base), "base must be a string (a preset name)");
    try {
      r = preset(*base->value<std::string>());
    } catch (const RecipeError& e) {
      fail(where(source, *base), e.what());
    }
    has_base = true;
  }
  // (override text, its location) in file order, with each operand's format first.
  std::vector<std::pair<std::string, std::string>> overrides;
  std::array<bool, kNumOperands> has_format{};
  for (const auto& [k, node] : doc) {
    const std::string key(k.str());
    if (key == "base") continue;
    if (key == "fprop" || key == "dgrad" || key == "wgrad") {
      const toml::table* gemm = node.as_table();
      if (!gemm) fail(where(source, node), key + " must be a table of operands");
      for (const auto& [ok, onode] : *gemm) {
        const std::string prefix = key + "." + std::string(ok.str());
        int index = -1;
        for (Operand op : kAllOperands)
          if (prefix == operand_name(op)) index = static_cast<int>(op);
        if (index < 0) fail(where(source, onode), "unknown operand '" + prefix + "'");
        const toml::table* fields = onode.as_table();
        if (!fields) fail(where(source, onode), prefix + " must be a table (format, block, rounding, rht)");
        if (const toml::node* f = fields->get("format")) {
          overrides.emplace_back(prefix + ".format=" + scalar_text(source, prefix + ".format", *f), where(source, *f));
          has_format[index] = true;
        }
        for (const auto& [fk, fnode] : *fields) {
          const std::string fkey = prefix + "." + std::string(fk.str());
          if (fk.str() == "format") continue;
          overrides.emplace_back(fkey + "=" + scalar_text(source, fkey, fnode), where(source, fnode));
        }
      }
      continue;
    }
    if (node.is_table()) fail(where(source, node), "unknown table '" + key + "' (expected fprop, dgrad, wgrad)");
    overrides.emplace_back(key + "=" + scalar_text(source, key, node), where(source, node));
  }
  if (!has_base) {
    for (Operand op : kAllOperands)
      if (!has_format[static_cast<int>(op)])
        fail(source, std::string("without a base preset every operand needs a format; ") + operand_name(op) +
                         " has none");
    r.name = std::filesystem::path(source).stem().string();
  }
  for (const auto& [text_, at] : overrides) apply_override(r, text_, at);
  try {
    validate(r);
  } catch (const RecipeError& e) {
    fail(source, e.what());
  }
  return r;
}

Recipe load_recipe_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw RecipeError(path.string() + ": cannot open the recipe file");
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) throw RecipeError(path.string() + ": cannot read the recipe file");
  return parse_recipe_toml(text.str(), path.string());
}

Recipe make_recipe(std::string_view base, std::span<const std::string> overrides) {
  Recipe r = base.ends_with(".toml") ? load_recipe_file(std::filesystem::path(base)) : preset(base);
  for (const std::string& o : overrides) apply_override(r, o, "--recipe-set " + o);
  validate(r);
  return r;
}

std::string to_toml(const Recipe& r) {
  toml::table doc;
  doc.insert("name", r.name);
  const auto blocks = [&](const char* key, int v) {
    if (v == kBf16BlocksPaperRatio) doc.insert(key, "auto");
    else doc.insert(key, v);
  };
  blocks("bf16_first_blocks", r.bf16_first_blocks);
  blocks("bf16_last_blocks", r.bf16_last_blocks);
  doc.insert("bf16_switch_fraction", r.bf16_switch_fraction);
  if (r.rht_sign_seed) {
    // TOML integers are signed 64-bit: larger seeds are written as strings of digits.
    if (*r.rht_sign_seed <= static_cast<uint64_t>(INT64_MAX))
      doc.insert("rht_sign_seed", static_cast<int64_t>(*r.rht_sign_seed));
    else
      doc.insert("rht_sign_seed", std::to_string(*r.rht_sign_seed));
  }
  for (Operand op : kAllOperands) {
    const std::string name = operand_name(op);
    const std::string gemm = name.substr(0, name.find('.')), which = name.substr(name.find('.') + 1);
    const OperandRecipe& o = r[op];
    toml::table t;
    t.insert("format", operand_format_name(o.format));
    t.insert("block", block_name(o.block));
    t.insert("rounding", std::string(rounding_name(o.rounding)));
    t.insert("rht", o.rht);
    if (!doc.contains(gemm)) doc.insert(gemm, toml::table{});
    doc[gemm].as_table()->insert(which, std::move(t));
  }
  std::ostringstream out;
  out << "# nibble recipe (complete: every operand spelled out)\n" << doc << "\n";
  return out.str();
}

std::string describe(const Recipe& r) {
  std::string s = r.name + ":";
  for (int i = 0; i < kNumOperands; ++i) {
    const std::string name = kOperandNames[i];
    const size_t dot = name.find('.');
    if (i % 2 == 0) {  // operands come in GEMM pairs
      s += i ? " | " : " ";
      s += name.substr(0, dot);
    }
    const OperandRecipe& o = r.operands[i];
    for (std::string_view part : {std::string_view(" "), std::string_view(name).substr(dot + 1), std::string_view("="),
                                  std::string_view(operand_format_name(o.format))})
      s += part;
    if (o.quantized()) {
      s += ' ';
      s += block_name(o.block);
      s += ' ';
      s += rounding_name(o.rounding);
    }
    if (o.rht) s += " rht";
  }
  // Which blocks stay in BF16, and from when every layer does: part of the recipe a run used.
  auto blocks = [](int n) { return n == kBf16BlocksPaperRatio ? std::string("auto") : std::to_string(n); };
  if (r.bf16_first_blocks != 0 || r.bf16_last_blocks != 0)
    s += " | bf16 blocks first=" + blocks(r.bf16_first_blocks) + " last=" + blocks(r.bf16_last_blocks);
  if (r.bf16_switch_fraction < 1.0) s += " | bf16 from " + number_text(r.bf16_switch_fraction) + " of steps";
  return s;
}

}  // namespace nibble::nn
