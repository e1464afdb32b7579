// onex-runner: a build's 1.x schedule from its manifest and AOTInductor packages, through libtorch alone.
//
//   onex-runner BUILD_DIR --batch B --latent-size S --text-len T --text FILE --pooled FILE --noise FILE --out FILE
//
// FILEs are raw little-endian float32 in C order: the text embeddings (B, T, joint_attention_dim), the pooled
// projections (B, pooled_projection_dim) and the starting noise (B, in_channels, S, S); --out gets the final
// latents in the same layout as the noise. It does what engines/README.md tells a service to do: check the
// manifest, load each graph's package (`graphs.<g>.compiled`), and for each step of `schedule.steps` run the
// step's plan (`plans.<plan>.steps`, binding values by name) and apply `schedule.step_rule`. Exit codes: 0 done,
// 1 a problem with the build or the inputs (one line on stderr), 2 bad usage.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>
#include <torch/version.h>

#include <nlohmann/json.hpp>

#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

using nlohmann::json;

namespace {

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The arguments after BUILD_DIR, as --name value pairs.
std::map<std::string, std::string> parse_options(int argc, char** argv) {
  std::map<std::string, std::string> out;
  for (int i = 2; i < argc; i += 2) {
    std::string name = argv[i];
    if (name.rfind("--", 0) != 0 || i + 1 >= argc) throw UsageError("expected --name value, got " + name);
    out[name.substr(2)] = argv[i + 1];
  }
  for (const char* needed : {"batch", "latent-size", "text-len", "text", "pooled", "noise", "out"})
    if (!out.count(needed)) throw UsageError(std::string("missing --") + needed);
  return out;
}

at::ScalarType scalar_type(const std::string& dtype) {
  if (dtype == "float32") return at::kFloat;
  if (dtype == "float16") return at::kHalf;
  if (dtype == "bfloat16") return at::kBFloat16;
  if (dtype == "int64") return at::kLong;
  throw std::runtime_error("unknown dtype " + dtype + " in the manifest");
}

at::Tensor read_f32(const std::string& path, const std::vector<int64_t>& shape) {
  at::Tensor t = at::empty(shape, at::kFloat);
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  in.read(reinterpret_cast<char*>(t.data_ptr<float>()), static_cast<std::streamsize>(t.numel() * sizeof(float)));
  if (in.gcount() != static_cast<std::streamsize>(t.numel() * sizeof(float)) || in.peek() != EOF)
    throw std::runtime_error(path + " does not hold " + std::to_string(t.numel()) + " float32 values");
  return t;
}

void write_f32(const std::string& path, const at::Tensor& t) {
  at::Tensor c = t.to(at::kFloat).contiguous();
  std::string tmp = path + ".partial";
  {
    std::ofstream out(tmp, std::ios::binary);
    out.write(reinterpret_cast<const char*>(c.data_ptr<float>()), static_cast<std::streamsize>(c.numel() * sizeof(float)));
    if (!out) throw std::runtime_error("cannot write " + tmp);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw std::runtime_error("cannot rename " + tmp + " to " + path);
}

// One graph: its package and the order and types of its inputs and outputs.
struct Graph {
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
  std::vector<std::pair<std::string, at::ScalarType>> inputs;
  std::vector<std::string> outputs;
};

std::map<std::string, Graph> load_graphs(const std::string& folder, const json& manifest) {
  std::map<std::string, Graph> graphs;
  for (const auto& [name, entry] : manifest.at("graphs").items()) {
    if (name == "text" || name == "vae") continue;  // the schedule needs the transformer's graphs only
    if (!entry.contains("compiled") || entry.at("compiled").is_null())
      throw std::runtime_error(folder + " has no AOTInductor package for graph " + name + ": build it with --aoti");
    const json& compiled = entry.at("compiled");
    if (compiled.at("torch").get<std::string>().rfind(TORCH_VERSION, 0) != 0)
      throw std::runtime_error("graph " + name + " was compiled by torch " + compiled.at("torch").get<std::string>() +
                               " and this runner links libtorch " + TORCH_VERSION + ": a package runs only under the torch that made it");
    Graph g;
    g.loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(folder + "/" + compiled.at("file").get<std::string>());
    for (const auto& t : entry.at("inputs")) g.inputs.emplace_back(t.at("name"), scalar_type(t.at("dtype")));
    for (const auto& t : entry.at("outputs")) g.outputs.push_back(t.at("name"));
    graphs.emplace(name, std::move(g));
  }
  return graphs;
}

// Runs a plan: each step's graph on the values its bind names ("inputs.x" or "<graph>.<output>").
std::map<std::string, at::Tensor> run_plan(const json& plan, std::map<std::string, Graph>& graphs,
                                           const std::map<std::string, at::Tensor>& feeds) {
  std::map<std::string, at::Tensor> values;
  for (const auto& [k, v] : feeds) values["inputs." + k] = v;
  for (const auto& step : plan.at("steps")) {
    const std::string name = step.at("graph");
    Graph& g = graphs.at(name);
    std::vector<at::Tensor> args;
    for (const auto& [input, dtype] : g.inputs)
      args.push_back(values.at(step.at("bind").at(input).get<std::string>()).to(dtype).contiguous());
    std::vector<at::Tensor> outs = g.loader->run(args);
    for (size_t i = 0; i < g.outputs.size(); ++i) values[name + "." + g.outputs[i]] = outs.at(i);
  }
  std::map<std::string, at::Tensor> out;
  for (const auto& [k, src] : plan.at("outputs").items()) out[k] = values.at(src.get<std::string>());
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc < 2 || std::string(argv[1]).rfind("--", 0) == 0)
      throw UsageError("usage: onex-runner BUILD_DIR --batch B --latent-size S --text-len T --text FILE --pooled FILE --noise FILE --out FILE");
    const std::string folder = argv[1];
    auto opt = parse_options(argc, argv);
    std::ifstream file(folder + "/manifest.json");
    if (!file) throw std::runtime_error("no manifest.json in " + folder);
    const json manifest = json::parse(file);
    if (manifest.at("schema") != "onex-export/build-manifest" || manifest.at("schema_version") != 2)
      throw std::runtime_error(folder + "/manifest.json is not a build manifest of schema version 2");
    if (manifest.at("status") == "failed") throw std::runtime_error(folder + " failed its parity gate");
    const json& schedule = manifest.at("schedule");
    const double eta = schedule.at("eta");
    if (eta != 1.0) throw std::runtime_error("this runner runs eta 1 schedules only (no fresh noise between steps)");
    const json& config = manifest.at("model").at("config");
    const int64_t batch = std::stoll(opt["batch"]), size = std::stoll(opt["latent-size"]), text_len = std::stoll(opt["text-len"]);
    at::Tensor text = read_f32(opt["text"], {batch, text_len, config.at("joint_attention_dim").get<int64_t>()});
    at::Tensor pooled = read_f32(opt["pooled"], {batch, config.at("pooled_projection_dim").get<int64_t>()});
    at::Tensor x = read_f32(opt["noise"], {batch, config.at("in_channels").get<int64_t>(), size, size});

    torch::NoGradGuard no_grad;
    auto graphs = load_graphs(folder, manifest);
    std::map<std::string, at::Tensor> deltas;
    for (const auto& step : schedule.at("steps")) {
      const double sigma = step.at("sigma"), next = step.at("sigma_next");
      std::map<std::string, at::Tensor> feeds = {{"hidden_states", x}, {"encoder_hidden_states", text},
                                                 {"pooled_projections", pooled},
                                                 {"timestep", at::full({batch}, step.at("timestep").get<double>())}};
      for (const auto& [k, v] : deltas) feeds[k] = v;  // the skipping plan takes the full step's deltas
      auto out = run_plan(manifest.at("plans").at(step.at("plan").get<std::string>()), graphs, feeds);
      for (const char* k : {"delta_img", "delta_ctx"})
        if (out.count(k)) deltas[k] = out[k];
      at::Tensor v = out.at("velocity").to(at::kFloat);
      at::Tensor x0 = x - sigma * v;
      x = next == 0.0 ? x0 : (1 - next) * x0 + next * (x + (1 - sigma) * v);
    }
    if (!torch::isfinite(x).all().item<bool>()) throw std::runtime_error("the latents are not finite: nothing written");
    write_f32(opt["out"], x);
    std::cout << "PASSED onex-runner: latents (" << batch << ", " << x.size(1) << ", " << size << ", " << size
              << ") written to " << opt["out"] << std::endl;
    return 0;
  } catch (const UsageError& e) {
    std::cerr << "error: " << e.what() << std::endl;
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\nFAILED" << std::endl;
    return 1;
  }
}
