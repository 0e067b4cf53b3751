#include "src/loop/config.hpp"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <charconv>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <variant>

#include "src/common/error.hpp"
#include "src/loop/policy.hpp"

namespace flashmem {

namespace {

using FieldRef = std::variant<int64_t*, double*, bool*, std::string*, std::vector<std::string>*>;

// The one table of fields: key path -> member. Order = declaration order (used by to_yaml).
std::vector<std::pair<std::string, FieldRef>> fields(RunConfig& c) {
  return {
      {"device", &c.device},
      {"model.weights", &c.model.weights},
      {"model.hidden", &c.model.hidden},
      {"model.layers", &c.model.layers},
      {"model.heads", &c.model.heads},
      {"model.vocab", &c.model.vocab},
      {"model.chunks", &c.model.chunks},
      {"model.seed", &c.model.seed},
      {"memory.structure", &c.memory.structure},
      {"memory.salient_fraction", &c.memory.salient_fraction},
      {"memory.salient_gain", &c.memory.salient_gain},
      {"memory.seed", &c.memory.seed},
      {"retriever.checkpoint", &c.retriever.checkpoint},
      {"retriever.seed", &c.retriever.seed},
      {"retriever.rank", &c.retriever.rank},
      {"retriever.heads", &c.retriever.heads},
      {"retriever.layers", &c.retriever.layers},
      {"retriever.max_position", &c.retriever.max_position},
      {"retriever.precision", &c.retriever.precision},
      {"keys.mode", &c.keys.mode},
      {"keys.path", &c.keys.path},
      {"keys.tensor", &c.keys.tensor},
      {"keys.seed", &c.keys.seed},
      {"loop.batch", &c.loop.batch},
      {"loop.prefill", &c.loop.prefill},
      {"loop.steps", &c.loop.steps},
      {"loop.tau", &c.loop.tau},
      {"loop.prompt", &c.loop.prompt},
      {"loop.prompt_tensor", &c.loop.prompt_tensor},
      {"loop.prompt_seed", &c.loop.prompt_seed},
      {"policy.kind", &c.policy.kind},
      {"policy.select", &c.policy.select},
      {"policy.top_k", &c.policy.top_k},
      {"policy.threshold", &c.policy.threshold},
      {"policy.ensemble", &c.policy.ensemble},
      {"policy.tail", &c.policy.tail},
      {"policy.sink", &c.policy.sink},
      {"policy.cap", &c.policy.cap},
      {"policy.seed", &c.policy.seed},
      {"shadow.enabled", &c.shadow.enabled},
      {"shadow.free_running", &c.shadow.free_running},
      {"output.dir", &c.output.dir},
      {"output.trace_tensors", &c.output.trace_tensors},
  };
}

std::string describe(const YAML::Node& node) {
  if (node.IsScalar()) return "'" + node.Scalar() + "'";
  if (node.IsSequence()) return "a list";
  if (node.IsMap()) return "a mapping";
  return "null";
}

// Sets one field from a YAML node; wrong types throw naming the key.
void set_field(const std::string& key, FieldRef ref, const YAML::Node& node, const std::string& source) {
  const auto bad = [&](const char* expected) {
    fail(source, ": ", key, ": ", describe(node), " is not ", expected);
  };
  std::visit(
      [&](auto* target) {
        using T = std::remove_pointer_t<decltype(target)>;
        if constexpr (std::is_same_v<T, std::vector<std::string>>) {
          if (node.IsScalar()) {  // "a,b,c" or a single name
            std::vector<std::string> out;
            std::stringstream in(node.Scalar());
            for (std::string item; std::getline(in, item, ',');)
              if (!item.empty()) out.push_back(item);
            *target = out;
            return;
          }
          if (!node.IsSequence()) bad("a list of names");
          std::vector<std::string> out;
          for (const auto& item : node) {
            if (!item.IsScalar()) bad("a list of names");
            out.push_back(item.Scalar());
          }
          *target = out;
        } else {
          if (!node.IsScalar()) {
            if constexpr (std::is_same_v<T, std::string>) {
              if (node.IsNull()) { *target = ""; return; }
            }
            bad(std::is_same_v<T, int64_t> ? "an integer" : std::is_same_v<T, double> ? "a number"
                : std::is_same_v<T, bool> ? "a boolean" : "a string");
          }
          if constexpr (std::is_same_v<T, std::string>) {
            *target = node.Scalar();
          } else {
            T value{};
            if (!YAML::convert<T>::decode(node, value))
              bad(std::is_same_v<T, int64_t> ? "an integer" : std::is_same_v<T, double> ? "a number" : "a boolean");
            *target = value;
          }
        }
      },
      ref);
}

void apply_node(RunConfig& cfg, const YAML::Node& root, const std::string& source) {
  if (!root || root.IsNull()) return;  // an empty file changes nothing
  if (!root.IsMap()) fail(source, ": expected a mapping of sections at the top level");
  auto table = fields(cfg);
  std::map<std::string, FieldRef> by_key(table.begin(), table.end());
  std::map<std::string, bool> sections;
  for (const auto& [key, ref] : table)
    if (auto dot = key.find('.'); dot != std::string::npos) sections[key.substr(0, dot)] = true;

  for (const auto& top : root) {
    const std::string name = top.first.as<std::string>();
    if (sections.count(name)) {
      if (top.second.IsNull()) continue;
      if (!top.second.IsMap()) fail(source, ": ", name, ": ", describe(top.second), " is not a mapping");
      for (const auto& leaf : top.second) {
        const std::string key = name + "." + leaf.first.as<std::string>();
        auto it = by_key.find(key);
        if (it == by_key.end()) fail(source, ": ", key, ": unknown key");
        set_field(key, it->second, leaf.second, source);
      }
    } else {
      auto it = by_key.find(name);
      if (it == by_key.end()) fail(source, ": ", name, ": unknown key");
      set_field(name, it->second, top.second, source);
    }
  }
}

template <typename... Names>
void one_of(const std::string& key, const std::string& value, std::initializer_list<const char*> names) {
  for (const char* n : names)
    if (value == n) return;
  std::string list;
  for (const char* n : names) list += (list.empty() ? "" : ", ") + std::string(n);
  fail(key, ": '", value, "' is not one of ", list);
}

}  // namespace

void RunConfig::validate() const {
  one_of("device", device, {"auto", "cpu", "cuda"});
  // model: with a weights file the shape is read from the file.
  if (model.weights.empty()) {
    if (model.hidden <= 0) fail("model.hidden: ", model.hidden, " must be > 0");
    if (model.heads <= 0) fail("model.heads: ", model.heads, " must be > 0");
    if (model.hidden % model.heads != 0)
      fail("model.heads: ", model.heads, " does not divide model.hidden = ", model.hidden);
    if (model.layers <= 0) fail("model.layers: ", model.layers, " must be > 0");
    if (model.vocab <= 0) fail("model.vocab: ", model.vocab, " must be > 0");
    if (model.chunks <= 0) fail("model.chunks: N = ", model.chunks, " must be > 0");
  }
  if (model.seed < 0) fail("model.seed: ", model.seed, " must be >= 0");
  one_of("memory.structure", memory.structure, {"random", "salient"});
  if (!(memory.salient_fraction > 0.0 && memory.salient_fraction <= 1.0))
    fail("memory.salient_fraction: ", memory.salient_fraction, " must be in (0, 1]");
  if (!(memory.salient_gain > 0.0 && memory.salient_gain <= 100.0))
    fail("memory.salient_gain: ", memory.salient_gain, " must be in (0, 100]");
  if (retriever.checkpoint.empty()) {
    if (retriever.rank <= 0) fail("retriever.rank: ", retriever.rank, " must be > 0");
    if (retriever.heads <= 0) fail("retriever.heads: ", retriever.heads, " must be > 0");
  }
  if (retriever.seed < 0) fail("retriever.seed: ", retriever.seed, " must be >= 0");
  if (retriever.max_position <= 0) fail("retriever.max_position: ", retriever.max_position, " must be > 0");
  one_of("retriever.precision", retriever.precision, {"exact", "fast"});
  one_of("keys.mode", keys.mode, {"memory", "mock", "file"});
  if (keys.mode == "file" && keys.path.empty()) fail("keys.path: empty, but keys.mode is file");
  if (keys.seed < 0) fail("keys.seed: ", keys.seed, " must be >= 0");
  if (loop.batch <= 0) fail("loop.batch: B = ", loop.batch, " must be > 0");
  if (loop.prefill <= 0) fail("loop.prefill: ", loop.prefill, " must be > 0 (the last prefill step seeds the first retrieval)");
  if (loop.steps < 0) fail("loop.steps: ", loop.steps, " must be >= 0");
  if (loop.tau <= 0) fail("loop.tau: ", loop.tau, " must be > 0");
  if (loop.prompt_seed < 0) fail("loop.prompt_seed: ", loop.prompt_seed, " must be >= 0");
  if (!keep_policy_registered(policy.kind)) {
    std::string names;
    for (const auto& n : keep_policy_names()) names += (names.empty() ? "" : ", ") + n;
    fail("policy.kind: '", policy.kind, "' is not a policy, expected one of ", names);
  }
  one_of("policy.select", policy.select, {"threshold", "topk"});
  if (policy.select == "topk" && policy.top_k <= 0) fail("policy.top_k: ", policy.top_k, " must be > 0");
  if (!(policy.threshold >= 0.0 && policy.threshold <= 1.0))
    fail("policy.threshold: ", policy.threshold, " must be in [0, 1] (scores are sigmoids)");
  one_of("policy.ensemble", policy.ensemble, {"max", "mean"});
  if (policy.tail < 0) fail("policy.tail: ", policy.tail, " must be >= 0");
  if (policy.sink < 0) fail("policy.sink: ", policy.sink, " must be >= 0");
  if (policy.cap < 0) fail("policy.cap: ", policy.cap, " must be >= 0 (0 = no cap)");
  if (policy.cap > 0 && policy.cap < policy.tail + policy.sink)
    fail("policy.cap: ", policy.cap, " is less than policy.tail + policy.sink = ", policy.tail + policy.sink);
  if (policy.seed < 0) fail("policy.seed: ", policy.seed, " must be >= 0");
  if (policy.kind == "oracle" && !shadow.enabled)
    fail("shadow.enabled: false, but policy.kind oracle needs the dense shadow");
}

void apply_yaml(RunConfig& cfg, const std::string& yaml_text, const std::string& source) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::Exception& e) {
    fail(source, ": not valid YAML: ", e.msg, " (line ", e.mark.line + 1, ")");
  }
  apply_node(cfg, root, source);
}

void load_config_file(RunConfig& cfg, const std::string& path) {
  std::ifstream in(path);
  if (!in) fail(path, ": cannot open config file");
  std::stringstream text;
  text << in.rdbuf();
  apply_yaml(cfg, text.str(), path);
}

void apply_override(RunConfig& cfg, const std::string& assignment) {
  const auto eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0) fail("--set ", assignment, ": expected key=value, e.g. loop.tau=32");
  const std::string key = assignment.substr(0, eq), value = assignment.substr(eq + 1);
  auto table = fields(cfg);
  auto it = std::find_if(table.begin(), table.end(), [&](const auto& f) { return f.first == key; });
  if (it == table.end()) fail("--set: ", key, ": unknown key");
  YAML::Node node;
  try {
    node = YAML::Load(value);
  } catch (const YAML::Exception& e) {
    fail("--set: ", key, ": '", value, "' is not a YAML value: ", e.msg);
  }
  if (!node || node.IsNull()) node = YAML::Node(value);  // "key=" -> empty string
  set_field(key, it->second, node, "--set");
}

std::string to_yaml(const RunConfig& cfg_in) {
  RunConfig cfg = cfg_in;
  YAML::Emitter out;
  out << YAML::BeginMap;
  std::string section;
  for (const auto& [key, ref] : fields(cfg)) {
    const auto dot = key.find('.');
    const std::string sec = dot == std::string::npos ? "" : key.substr(0, dot);
    const std::string leaf = dot == std::string::npos ? key : key.substr(dot + 1);
    if (sec != section) {
      if (!section.empty()) out << YAML::EndMap;
      if (!sec.empty()) out << YAML::Key << sec << YAML::Value << YAML::BeginMap;
      section = sec;
    }
    out << YAML::Key << leaf << YAML::Value;
    std::visit(
        [&](auto* v) {
          using T = std::remove_pointer_t<decltype(v)>;
          if constexpr (std::is_same_v<T, std::vector<std::string>>) {
            out << YAML::Flow << YAML::BeginSeq;
            for (const auto& s : *v) out << s;
            out << YAML::EndSeq;
          } else if constexpr (std::is_same_v<T, std::string>) {
            out << YAML::DoubleQuoted << *v;
          } else if constexpr (std::is_same_v<T, bool>) {
            out << YAML::TrueFalseBool << *v;
          } else if constexpr (std::is_same_v<T, double>) {
            char buf[64];  // shortest text that reads back as the same double
            const auto end = std::to_chars(buf, buf + sizeof buf, *v).ptr;
            out << std::string(buf, end);
          } else {
            out << *v;
          }
        },
        ref);
  }
  if (!section.empty()) out << YAML::EndMap;
  out << YAML::EndMap;
  return std::string(out.c_str()) + "\n";
}

std::vector<std::string> config_keys() {
  RunConfig cfg;
  std::vector<std::string> keys;
  for (const auto& f : fields(cfg)) keys.push_back(f.first);
  return keys;
}

}  // namespace flashmem
