#include "nibble/train/trainer.h"

#include <chrono>
#include <cmath>
#include <sstream>
#include <stdexcept>
#include <utility>

#include "nibble/tensor/atomic_file.h"
#include "nibble/train/checkpoint.h"

namespace nibble::train {

namespace fs = std::filesystem;

nlohmann::json TrainOptions::to_json() const {
  return {{"steps", steps},
          {"batch_size", batch_size},
          {"grad_accum", grad_accum},
          {"seq_len", seq_len},
          {"schedule", schedule_kind_name(schedule.kind)},
          {"lr", schedule.max_lr},
          {"min_lr", schedule.min_lr},
          {"warmup", schedule.warmup},
          {"decay", schedule.decay},
          {"beta1", adamw.beta1},
          {"beta2", adamw.beta2},
          {"eps", adamw.eps},
          {"weight_decay", adamw.weight_decay},
          {"grad_clip", grad_clip},
          {"seed", seed}};
}

namespace {

// The seeds of a run's three random streams, derived from the one run seed.
uint64_t init_seed(uint64_t seed) { return seed ^ 0x9E3779B97F4A7C15ull; }
uint64_t sampler_seed(uint64_t seed) { return seed; }

void check_options(const TrainOptions& o, int64_t model_seq) {
  auto bad = [](const std::string& why) { throw TrainError("invalid training options: " + why); };
  if (o.out_dir.empty()) bad("no output directory");
  if (o.steps <= 0) bad("steps must be positive");
  if (o.batch_size <= 0) bad("batch size must be positive");
  if (o.grad_accum <= 0) bad("gradient accumulation must be positive");
  if (o.seq_len < 0 || o.seq_len > model_seq)
    bad("seq_len " + std::to_string(o.seq_len) + " exceeds the model's " + std::to_string(model_seq));
  if (!(o.grad_clip >= 0)) bad("gradient clipping threshold must be >= 0");
  if (o.val_every < 0 || o.val_batches < 0 || o.ckpt_every < 0 || o.stop_after < 0) bad("negative interval");
  try {
    LrSchedule s = o.schedule;
    s.total = o.steps;
    s.validate();
  } catch (const std::invalid_argument& e) {
    bad(e.what());
  }
}

// A step's inputs and targets from windows of seq + 1 tokens.
void split_windows(const std::vector<uint32_t>& windows, int64_t batch, int64_t seq, std::vector<uint32_t>& inputs,
                   std::vector<uint32_t>& targets) {
  inputs.resize(static_cast<size_t>(batch * seq));
  targets.resize(inputs.size());
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t t = 0; t < seq; ++t) {
      inputs[b * seq + t] = windows[b * (seq + 1) + t];
      targets[b * seq + t] = windows[b * (seq + 1) + t + 1];
    }
}

class CpuEngine final : public Engine {
 public:
  CpuEngine(model::Gpt& model, AdamW& optimizer) : model_(model), optimizer_(optimizer) {}
  std::string device() const override { return "cpu"; }
  void set_bf16_everywhere(bool on) override { model_.set_bf16_everywhere(on); }
  void zero_grad() override { model_.zero_grad(); }
  void forward_backward(uint64_t step, uint32_t microbatch, std::span<const uint32_t> inputs,
                        std::span<const uint32_t> targets, int64_t batch, int64_t seq, float grad_scale) override {
    model_.set_step(step, microbatch);
    outcome_.losses.push_back(model_.forward_backward(inputs, targets, batch, seq, grad_scale));
  }
  void update(double lr, double grad_clip) override {
    std::vector<model::Parameter> params = model_.parameters();
    const double norm = global_grad_norm(params);
    outcome_.grad_norm = norm;
    outcome_.updated = std::isfinite(step_loss(outcome_.losses)) && std::isfinite(norm);
    if (!outcome_.updated) return;
    optimizer_.step(params, lr, clip_multiplier(grad_clip, norm));
  }
  StepOutcome finish_step() override { return std::exchange(outcome_, {}); }
  double loss(std::span<const uint32_t> inputs, std::span<const uint32_t> targets, int64_t batch,
              int64_t seq) override {
    return model_.loss(inputs, targets, batch, seq);
  }
  double memory_mib() override { return peak_rss_mib(); }

 private:
  model::Gpt& model_;
  AdamW& optimizer_;
  StepOutcome outcome_;
};

// The same windows every time (the sampler is rewound to its start), so evaluations are comparable
// across steps.
double validation_loss(Engine& model, data::WindowSampler& sampler, const data::SamplerPosition& start,
                       const TrainOptions& o, int64_t seq) {
  sampler.restore(start);
  const int64_t batches = std::max<int64_t>(1, std::min<int64_t>(o.val_batches, static_cast<int64_t>(
      sampler.windows_per_epoch() / static_cast<uint64_t>(o.batch_size))));
  std::vector<uint32_t> windows(static_cast<size_t>(o.batch_size * (seq + 1))), inputs, targets;
  double sum = 0.0;
  for (int64_t i = 0; i < batches; ++i) {
    sampler.next(static_cast<size_t>(o.batch_size), windows.data());
    split_windows(windows, o.batch_size, seq, inputs, targets);
    sum += model.loss(inputs, targets, o.batch_size, seq);
  }
  return sum / static_cast<double>(batches);
}

}  // namespace

std::unique_ptr<Engine> make_cpu_engine(model::Gpt& model, AdamW& optimizer) {
  return std::make_unique<CpuEngine>(model, optimizer);
}

TrainResult train(const model::GptConfig& config, const nn::Recipe& recipe, const data::TokenDataset& train_data,
                  const data::TokenDataset* val_data, const TrainOptions& o) {
  check_options(o, config.seq_len);
  const int64_t seq = o.seq_len > 0 ? o.seq_len : config.seq_len;
  LrSchedule schedule = o.schedule;
  schedule.total = o.steps;
  if (train_data.vocab_size() > static_cast<uint64_t>(config.vocab_size))
    throw TrainError("the training data's vocabulary (" + std::to_string(train_data.vocab_size()) +
                     " ids) does not fit the model's vocab_size " + std::to_string(config.vocab_size));
  if (val_data && val_data->vocab_size() > static_cast<uint64_t>(config.vocab_size))
    throw TrainError("the validation data's vocabulary (" + std::to_string(val_data->vocab_size()) +
                     " ids) does not fit the model's vocab_size " + std::to_string(config.vocab_size));

  fs::create_directories(o.out_dir);
  model::Gpt model(config, recipe, init_seed(o.seed), o.seed);
  AdamW optimizer(o.adamw);
  data::WindowSampler sampler(train_data, static_cast<size_t>(seq + 1), static_cast<size_t>(seq), sampler_seed(o.seed));
  // Made now so that validation data too short for one window fails before any training.
  std::optional<data::WindowSampler> val_sampler;
  if (val_data) val_sampler.emplace(*val_data, static_cast<size_t>(seq + 1), static_cast<size_t>(seq), 0);
  const data::SamplerPosition val_start = val_sampler ? val_sampler->position() : data::SamplerPosition{};

  TrainResult result;
  const std::optional<fs::path> latest = latest_checkpoint(o.out_dir);
  if (o.resume) {
    if (!latest) throw TrainError(o.out_dir.string() + ": --resume given but the run has no checkpoint");
    CheckpointState st = load_checkpoint(*latest, model, optimizer);
    if (st.seed != o.seed)
      throw TrainError(latest->string() + ": the checkpoint's seed " + std::to_string(st.seed) +
                       " differs from this run's " + std::to_string(o.seed) + " (the resumed run would differ)");
    sampler.restore(st.data_position);
    result.start_step = st.step;
    result.last_checkpoint = latest;
  } else if (latest || fs::exists(o.out_dir / "metrics.jsonl")) {
    throw TrainError(o.out_dir.string() + ": already holds a run; pass --resume to continue it or choose another --out");
  }
  // The engine starts from the host state: fresh weights, or the checkpoint just loaded.
  const std::unique_ptr<Engine> engine = o.make_engine ? o.make_engine(model, optimizer) : make_cpu_engine(model, optimizer);
  {
    std::ostringstream text;
    text << "device: " << engine->device() << "\n"
         << "model: " << config.name << " (" << config.parameter_count() << " parameters)\n"
         << model::to_toml(config) << "recipe: " << nn::describe(recipe) << "\n";
    AtomicFileWriter w(o.out_dir / "run.txt");
    const std::string s = text.str();
    w.write(s.data(), s.size());
    w.commit();
  }

  MetricsLog metrics(o.out_dir, o.resume ? result.start_step : -1);
  Progress progress(o.progress, o.log_every);
  if (o.resume) progress.message("resumed from " + result.last_checkpoint->string() + " at step " +
                                 std::to_string(result.start_step));
  if (result.start_step >= o.steps)
    progress.message("the run is already at step " + std::to_string(result.start_step) + " of " +
                     std::to_string(o.steps) + "; nothing to do (raise --steps to continue it)");

  const int64_t switch_step = recipe.bf16_switch_fraction >= 1.0
                                  ? o.steps
                                  : static_cast<int64_t>(std::ceil(recipe.bf16_switch_fraction * static_cast<double>(o.steps)));
  const int64_t tokens_per_step = o.batch_size * seq * o.grad_accum;
  // Model FLOPs per token (PaLM's count): 6 per parameter (forward + backward) plus attention's
  // score and value matmuls, 12 * layers * d_model * seq.
  const double flops_per_token = 6.0 * static_cast<double>(config.parameter_count()) +
                                 12.0 * static_cast<double>(config.n_layers * config.d_model * seq);
  const float micro_scale = 1.0f / static_cast<float>(o.grad_accum);
  // Each micro-batch's windows, drawn a step ahead: the next step's while the engine computes this one.
  std::vector<std::vector<uint32_t>> windows(static_cast<size_t>(o.grad_accum),
                                             std::vector<uint32_t>(static_cast<size_t>(o.batch_size * (seq + 1))));
  std::vector<uint32_t> inputs, targets;
  const auto draw_windows = [&] {
    for (auto& w : windows) sampler.next(static_cast<size_t>(o.batch_size), w.data());
  };
  data::SamplerPosition after_step = sampler.position();  // past the current step's windows: what a checkpoint saves
  const auto run_start = std::chrono::steady_clock::now();
  int64_t end = o.steps;
  if (o.stop_after > 0) end = std::min(end, result.start_step + o.stop_after);

  auto checkpoint_state = [&](int64_t done) {
    return CheckpointState{done, after_step, o.seed, model.bf16_everywhere(), o.to_json()};
  };

  for (int64_t step = result.start_step; step < end; ++step) {
    const auto t0 = std::chrono::steady_clock::now();
    if (o.on_step_start) o.on_step_start(step, model);
    if (step >= switch_step && !model.bf16_everywhere()) {
      engine->set_bf16_everywhere(true);
      progress.message("step " + std::to_string(step + 1) + ": switching every layer to bf16 (bf16_switch_fraction " +
                       std::to_string(recipe.bf16_switch_fraction) + ")");
    }
    if (step == result.start_step) draw_windows();  // later steps' windows were drawn a step ahead
    after_step = sampler.position();
    const double lr = schedule.at(step);
    engine->zero_grad();
    for (int64_t micro = 0; micro < o.grad_accum; ++micro) {
      split_windows(windows[static_cast<size_t>(micro)], o.batch_size, seq, inputs, targets);
      engine->forward_backward(static_cast<uint64_t>(step), static_cast<uint32_t>(micro), inputs, targets,
                               o.batch_size, seq, micro_scale);
    }
    engine->update(lr, o.grad_clip);
    if (step + 1 < end) draw_windows();
    const StepOutcome outcome = engine->finish_step();
    const double loss = step_loss(outcome.losses), norm = outcome.grad_norm;
    StepRecord rec{step + 1, loss, lr, norm, false};
    const bool finite = std::isfinite(loss) && std::isfinite(norm);
    if (outcome.updated != finite)
      throw std::logic_error("step " + std::to_string(step + 1) + ": the engine " +
                             (outcome.updated ? "applied" : "skipped") + " the update, against the trainer's rule");
    if (!finite) {
      const std::string what = "step " + std::to_string(step + 1) + ": non-finite " +
                               (!std::isfinite(loss) ? "loss (" + std::to_string(loss) + ")"
                                                     : "gradient norm (" + std::to_string(norm) + ")");
      if (!o.skip_nonfinite) {
        progress.finish();
        throw TrainError(what + "; stopping. The last good checkpoint is " +
                         (result.last_checkpoint ? result.last_checkpoint->string() : std::string("(none yet)")) +
                         " (continue with --resume, or pass --skip-nonfinite to skip such steps)");
      }
      rec.skipped = true;
      progress.message(what + "; skipping the update");
    }
    result.steps.push_back(rec);

    const double step_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - run_start).count();
    const int64_t done_here = step + 1 - result.start_step;
    const double eta = elapsed / static_cast<double>(done_here) * static_cast<double>(end - step - 1);
    nlohmann::json line = {{"step", step + 1},
                           {"loss", loss},
                           {"lr", lr},
                           {"grad_norm", norm},
                           {"tokens", (step + 1) * tokens_per_step},
                           {"tokens_per_s", static_cast<double>(tokens_per_step) / step_s},
                           {"step_s", step_s},
                           {"peak_rss_mib", peak_rss_mib()},
                           {"memory_mib", engine->memory_mib()},
                           {"bf16_everywhere", model.bf16_everywhere()}};
    if (engine->peak_flops() > 0)
      line["mfu"] = flops_per_token * static_cast<double>(tokens_per_step) / step_s / engine->peak_flops();
    if (outcome.device_wait_s >= 0) line["device_wait_s"] = outcome.device_wait_s;
    if (rec.skipped) line["skipped"] = true;
    if (!std::isfinite(loss)) line["loss"] = nullptr;  // JSON has no NaN
    if (!std::isfinite(norm)) line["grad_norm"] = nullptr;
    metrics.write(line);
    progress.step({step + 1, o.steps, loss, lr, norm, static_cast<double>(tokens_per_step) / step_s, eta});

    const bool last = step + 1 == o.steps;
    const bool stopping = o.stop_requested != nullptr && o.stop_requested->load() && !last;
    // The checkpoint first: a validation that fails (bad validation data) loses no training.
    if ((o.ckpt_every > 0 && (step + 1) % o.ckpt_every == 0) || last || stopping) {
      engine->to_host();
      result.last_checkpoint = save_checkpoint(o.out_dir, model, optimizer, checkpoint_state(step + 1), o.keep_checkpoints);
    }
    if (val_data && ((o.val_every > 0 && (step + 1) % o.val_every == 0) || last)) {
      const double vl = validation_loss(*engine, *val_sampler, val_start, o, seq);
      result.val.emplace_back(step + 1, vl);
      metrics.write({{"step", step + 1}, {"val_loss", vl}});
      char buf[96];
      std::snprintf(buf, sizeof buf, "step %lld: validation loss %.4f", static_cast<long long>(step + 1), vl);
      progress.message(buf);
    }
    if (stopping) {
      progress.message("interrupted after step " + std::to_string(step + 1) + "; saved " +
                       result.last_checkpoint->string() + " (continue with --resume)");
      end = step + 1;
      break;
    }
  }
  progress.finish();
  result.end_step = end;
  return result;
}

}  // namespace nibble::train
