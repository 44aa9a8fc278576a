// Recipes: presets, ablations, overrides, TOML in and out, and the errors for invalid recipes.
#include "nibble/nn/recipe.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <random>

#include "nn/nn_test_util.h"

namespace nibble::nn {
namespace {

OperandRecipe op(OperandFormat f, Block b, Rounding r = Rounding::kNearestEven, bool rht = false) {
  return OperandRecipe{f, b, r, rht};
}

// The message of the RecipeError that `fn` throws ("" if it throws none).
template <typename Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const RecipeError& e) {
    return e.what();
  }
  return "";
}

#define EXPECT_RECIPE_ERROR(stmt, fragment)                                         \
  do {                                                                              \
    const std::string msg_ = error_of([&] { stmt; });                               \
    EXPECT_NE(msg_.find(fragment), std::string::npos) << "message: '" << msg_ << "'"; \
  } while (0)

TEST(Recipe, Nvfp4PresetIsThePapersRecipe) {
  const Recipe r = preset("nvfp4");
  const auto nv = OperandFormat::kNvfp4;
  EXPECT_EQ(r[Operand::kFpropX], op(nv, Block::k1x16));
  EXPECT_EQ(r[Operand::kFpropW], op(nv, Block::k16x16));
  EXPECT_EQ(r[Operand::kDgradDy], op(nv, Block::k1x16, Rounding::kStochastic));
  EXPECT_EQ(r[Operand::kDgradW], op(nv, Block::k16x16));
  EXPECT_EQ(r[Operand::kWgradDy], op(nv, Block::k1x16, Rounding::kStochastic, true));
  EXPECT_EQ(r[Operand::kWgradX], op(nv, Block::k1x16, Rounding::kNearestEven, true));
  EXPECT_EQ(r.rht_signs().negative_mask, kDefaultRhtSigns.negative_mask);
  EXPECT_EQ(describe(r),
            "nvfp4: fprop x=nvfp4 1x16 rne w=nvfp4 16x16 rne | dgrad dy=nvfp4 1x16 sr w=nvfp4 16x16 rne | "
            "wgrad dy=nvfp4 1x16 sr rht x=nvfp4 1x16 rne rht | bf16 blocks first=auto last=auto");
  Recipe all_fp4 = r;
  all_fp4.bf16_first_blocks = all_fp4.bf16_last_blocks = 0;
  all_fp4.bf16_switch_fraction = 0.82;
  const std::string text = describe(all_fp4);
  EXPECT_EQ(text.find("bf16 blocks"), std::string::npos) << text;
  EXPECT_NE(text.find(" | bf16 from 0.82 of steps"), std::string::npos) << text;
}

TEST(Recipe, EveryPresetValidates) {
  for (const std::string& name : preset_names()) {
    const Recipe r = preset(name);
    EXPECT_EQ(r.name, name);
    EXPECT_NO_THROW(validate(r)) << name;
  }
  const Recipe hybrid = preset("fp8_hybrid");
  EXPECT_EQ(hybrid[Operand::kFpropX].format, OperandFormat::kFp8E4M3);
  EXPECT_EQ(hybrid[Operand::kDgradDy].format, OperandFormat::kFp8E5M2);
  EXPECT_EQ(hybrid[Operand::kWgradDy].format, OperandFormat::kFp8E5M2);
  EXPECT_EQ(hybrid[Operand::kWgradX].format, OperandFormat::kFp8E4M3);
  for (Operand o : kAllOperands) EXPECT_EQ(preset("fp8")[o], op(OperandFormat::kFp8E4M3, Block::kTensor));
  for (Operand o : kAllOperands) EXPECT_EQ(preset("mxfp4")[o].block, Block::k1x32);
}

TEST(Recipe, AblationsTurnOffOneTechniqueEach) {
  const Recipe base = preset("nvfp4");
  Recipe r = make_recipe("nvfp4", std::vector<std::string>{"no_rht"});
  EXPECT_EQ(r.name, "nvfp4+no_rht");
  for (Operand o : kAllOperands) {
    EXPECT_FALSE(r[o].rht);
    EXPECT_EQ(r[o].block, base[o].block);
    EXPECT_EQ(r[o].rounding, base[o].rounding);
  }
  r = make_recipe("nvfp4", std::vector<std::string>{"no_2d"});
  EXPECT_EQ(r[Operand::kFpropW].block, Block::k1x16);
  EXPECT_EQ(r[Operand::kDgradW].block, Block::k1x16);
  EXPECT_TRUE(r[Operand::kWgradX].rht);
  r = make_recipe("nvfp4", std::vector<std::string>{"no_sr", "no_rht"});
  EXPECT_EQ(r.name, "nvfp4+no_sr+no_rht");
  for (Operand o : kAllOperands) EXPECT_EQ(r[o], op(OperandFormat::kNvfp4, base[o].block));
}

TEST(Recipe, KeyValueOverrides) {
  const Recipe r = make_recipe(
      "nvfp4", std::vector<std::string>{"wgrad.dy.rounding = rne", "fprop.x.format=bf16", "dgrad.dy.format=fp8_e5m2",
                                        "bf16_first_blocks=2", "bf16_last_blocks=8", "bf16_switch_fraction=0.75",
                                        "rht_sign_seed=1234", "name=mine"});
  EXPECT_EQ(r.name, "mine");
  EXPECT_EQ(r[Operand::kWgradDy].rounding, Rounding::kNearestEven);
  EXPECT_EQ(r[Operand::kFpropX], op(OperandFormat::kBf16, Block::kTensor));
  EXPECT_EQ(r[Operand::kDgradDy], op(OperandFormat::kFp8E5M2, Block::kTensor, Rounding::kStochastic));
  EXPECT_EQ(r.bf16_first_blocks, 2);
  EXPECT_EQ(r.bf16_last_blocks, 8);
  EXPECT_EQ(r.bf16_switch_fraction, 0.75);
  EXPECT_EQ(r.rht_signs().negative_mask, rht_signs_from_seed(1234).negative_mask);
}

TEST(Recipe, SelectiveBf16Blocks) {
  Recipe r = preset("nvfp4");
  r.bf16_first_blocks = 2;
  r.bf16_last_blocks = 3;
  std::string kept;
  for (int i = 0; i < 10; ++i) kept += r.keeps_bf16(i, 10) ? 'B' : '4';
  EXPECT_EQ(kept, "BB44444BBB");
}

// The presets keep the paper's ratio of bf16 blocks (first 2 and last 8 of 62), rounded per depth.
TEST(Recipe, PaperRatioOfBf16Blocks) {
  const Recipe r = preset("nvfp4");
  EXPECT_EQ(r.bf16_first_blocks, kBf16BlocksPaperRatio);
  EXPECT_EQ(r.first_bf16_blocks(62), 2);
  EXPECT_EQ(r.last_bf16_blocks(62), 8);
  EXPECT_EQ(r.first_bf16_blocks(12), 0);  // GPT-2 124M: 0.39 and 1.55 blocks
  EXPECT_EQ(r.last_bf16_blocks(12), 2);
  EXPECT_EQ(r.first_bf16_blocks(24), 1);  // GPT-2 350M: 0.77 and 3.10
  EXPECT_EQ(r.last_bf16_blocks(24), 3);
  std::string kept;
  for (int i = 0; i < 12; ++i) kept += r.keeps_bf16(i, 12) ? 'B' : '4';
  EXPECT_EQ(kept, "4444444444BB");
  EXPECT_EQ(preset("bf16").first_bf16_blocks(62), 0);
  const Recipe fixed = make_recipe("nvfp4", std::vector<std::string>{"bf16_first_blocks=0", "bf16_last_blocks=0"});
  EXPECT_FALSE(fixed.keeps_bf16(11, 12));
  const Recipe back = make_recipe("bf16", std::vector<std::string>{"bf16_last_blocks=auto"});
  EXPECT_EQ(back.last_bf16_blocks(62), 8);
  EXPECT_EQ(parse_recipe_toml(to_toml(r), "roundtrip.toml"), r);
}

TEST(Recipe, TomlRoundTripOfRandomRecipes) {
  std::mt19937_64 rng(test::fresh_seed());
  const std::vector<std::string> tweaks = {"no_rht", "no_2d", "no_sr", "fprop.x.format=bf16", "dgrad.w.format=fp32",
                                           "wgrad.dy.format=fp8_e5m2", "bf16_first_blocks=3",
                                           "bf16_switch_fraction=0.123456789", "rht_sign_seed=18446744073709551615"};
  for (int trial = 0; trial < 20; ++trial) {
    const auto names = preset_names();
    std::vector<std::string> overrides;
    for (int i = 0; i < 3; ++i) overrides.push_back(tweaks[rng() % tweaks.size()]);
    Recipe r;
    try {
      r = make_recipe(names[rng() % names.size()], overrides);
    } catch (const RecipeError&) {
      continue;  // a random combination may be invalid (e.g. RHT left on one Wgrad operand only)
    }
    const Recipe back = parse_recipe_toml(to_toml(r), "roundtrip.toml");
    EXPECT_EQ(back, r) << to_toml(r);
  }
}

TEST(Recipe, TomlWithBaseAndPartialTables) {
  const Recipe r = parse_recipe_toml(R"(
base = "nvfp4"
name = "nvfp4_rne_grads"
bf16_last_blocks = 8
[wgrad.dy]
rounding = "rne"
[dgrad]
dy = { rounding = "rne" }
)",
                                     "inline.toml");
  Recipe want = preset("nvfp4");
  want.name = "nvfp4_rne_grads";
  want.bf16_last_blocks = 8;
  want[Operand::kWgradDy].rounding = want[Operand::kDgradDy].rounding = Rounding::kNearestEven;
  EXPECT_EQ(r, want);
}

TEST(Recipe, ShippedRecipeFilesLoad) {
  const std::filesystem::path dir = std::filesystem::path(NIBBLE_SOURCE_DIR) / "configs" / "recipes";
  int files = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    if (entry.path().extension() != ".toml") continue;
    ++files;
    EXPECT_NO_THROW(make_recipe(entry.path().string())) << entry.path();
  }
  EXPECT_GE(files, 2);
  // The paper file spells out the nvfp4 preset plus the 12B model's selective BF16 layers.
  Recipe paper = make_recipe((dir / "nvfp4_paper.toml").string());
  Recipe want = preset("nvfp4");
  want.name = "nvfp4_paper";
  want.bf16_first_blocks = 2;
  want.bf16_last_blocks = 8;
  EXPECT_EQ(paper, want);
}

TEST(Recipe, InvalidCombinationsAreNamed) {
  EXPECT_RECIPE_ERROR(make_recipe("mxfp4", std::vector<std::string>{"fprop.w.block=16x16"}),
                      "fprop.w: mxfp4 takes 1x32 blocks, not 16x16");
  EXPECT_RECIPE_ERROR(make_recipe("nvfp4", std::vector<std::string>{"fprop.x.block=1x32"}),
                      "fprop.x: nvfp4 takes 1x16 or 16x16 blocks");
  EXPECT_RECIPE_ERROR(make_recipe("fp8", std::vector<std::string>{"fprop.x.block=1x16"}), "fprop.x: fp8_e4m3 has no blocks");
  EXPECT_RECIPE_ERROR(make_recipe("nvfp4", std::vector<std::string>{"fprop.x.rht=true"}),
                      "fprop.x: the RHT is applied only to the Wgrad inputs");
  EXPECT_RECIPE_ERROR(make_recipe("nvfp4", std::vector<std::string>{"wgrad.x.rht=false"}),
                      "wgrad.dy and wgrad.x must both use the RHT or neither");
  EXPECT_RECIPE_ERROR(make_recipe("nvfp4", std::vector<std::string>{"wgrad.x.block=16x16"}),
                      "wgrad.x: the RHT applies to 1D blocks");
  EXPECT_RECIPE_ERROR(make_recipe("bf16", std::vector<std::string>{"dgrad.dy.rounding=sr"}),
                      "dgrad.dy: stochastic rounding applies to quantized formats");
  EXPECT_RECIPE_ERROR(make_recipe("nvfp4", std::vector<std::string>{"bf16_switch_fraction=1.5"}),
                      "bf16_switch_fraction must lie in [0, 1]");
  EXPECT_RECIPE_ERROR(make_recipe("nvfp4", std::vector<std::string>{"bf16_first_blocks=-2"}), "must be >= 0 or");
}

TEST(Recipe, UnknownNamesAreErrors) {
  EXPECT_RECIPE_ERROR(preset("nvfp8"), "unknown recipe 'nvfp8' (expected fp32, bf16, fp8, fp8_hybrid, nvfp4, mxfp4");
  EXPECT_RECIPE_ERROR(make_recipe("nvfp4", std::vector<std::string>{"no_hadamard"}), "unknown override 'no_hadamard'");
  EXPECT_RECIPE_ERROR(make_recipe("nvfp4", std::vector<std::string>{"fprop.y.format=nvfp4"}),
                      "unknown key 'fprop.y.format'");
  EXPECT_RECIPE_ERROR(make_recipe("nvfp4", std::vector<std::string>{"fprop.x.scale=2"}), "unknown key 'fprop.x.scale'");
  EXPECT_RECIPE_ERROR(make_recipe("nvfp4", std::vector<std::string>{"fprop.x.format=fp5"}),
                      "fprop.x.format: unknown format 'fp5'");
  EXPECT_RECIPE_ERROR(make_recipe("nvfp4", std::vector<std::string>{"fprop.x.rounding=up"}), "unknown rounding 'up'");
  EXPECT_RECIPE_ERROR(make_recipe("nvfp4", std::vector<std::string>{"wgrad.x.rht=yes"}), "expected true or false");
  EXPECT_RECIPE_ERROR(make_recipe("nvfp4", std::vector<std::string>{"bf16_last_blocks=two"}), "expected a number");
}

TEST(Recipe, TomlErrorsNameFileAndLine) {
  EXPECT_RECIPE_ERROR(parse_recipe_toml("base = \"nvfp4\"\n[wgrad.dy\n", "bad.toml"), "bad.toml:2");
  EXPECT_RECIPE_ERROR(parse_recipe_toml("base = \"nvfp4\"\n\n[fprop.x]\nblock = 16\n", "t.toml"),
                      "t.toml:4: fprop.x.block must be a string");
  EXPECT_RECIPE_ERROR(parse_recipe_toml("base = \"nvfp4\"\nbogus = 1\n", "t.toml"), "t.toml:2: unknown key 'bogus'");
  EXPECT_RECIPE_ERROR(parse_recipe_toml("base = \"nvfp4\"\n[attention]\nformat = \"nvfp4\"\n", "t.toml"),
                      "unknown table 'attention'");
  EXPECT_RECIPE_ERROR(parse_recipe_toml("base = \"nvfp4\"\n[fprop.q]\nformat = \"nvfp4\"\n", "t.toml"),
                      "unknown operand 'fprop.q'");
  EXPECT_RECIPE_ERROR(parse_recipe_toml("base = \"nvfp9\"\n", "t.toml"), "t.toml:1: unknown recipe 'nvfp9'");
  EXPECT_RECIPE_ERROR(parse_recipe_toml("[fprop.x]\nformat = \"bf16\"\n", "t.toml"),
                      "t.toml: without a base preset every operand needs a format; fprop.w has none");
  EXPECT_RECIPE_ERROR(parse_recipe_toml("base = \"mxfp4\"\n[fprop.w]\nblock = \"16x16\"\n", "t.toml"),
                      "t.toml: recipe 'mxfp4': fprop.w: mxfp4 takes 1x32 blocks");
  EXPECT_RECIPE_ERROR(load_recipe_file("/nonexistent/r.toml"), "/nonexistent/r.toml: cannot open the recipe file");
}

}  // namespace
}  // namespace nibble::nn
