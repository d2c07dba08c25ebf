// Runs one exported returnt-zoo artifact from C++, without Python:
//   <mode>.aoti.pt2  AOTInductor package   (torch::inductor::AOTIModelPackageLoader)
//   <mode>.pt        TorchScript module    (torch::jit::load)
// The input is a tensor saved from Python with torch.save(x, "input.pt"); the outputs are
// written as a tuple of tensors that Python reads with torch.load("output.pt").
//
//   ./run_model artifacts/resnet/out.aoti.pt2 input.pt output.pt

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>
#include <torch/serialize.h>

#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

namespace {

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() &&
         text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::vector<char> read_bytes(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    throw std::runtime_error("cannot open " + path);
  }
  return {std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
}

// A tensor saved with Python's torch.save.
at::Tensor read_tensor(const std::string& path) {
  return torch::pickle_load(read_bytes(path)).toTensor();
}

// Outputs as a tuple that Python's torch.load (weights_only) reads back.
void write_tensors(const std::string& path, const std::vector<at::Tensor>& tensors) {
  std::vector<c10::IValue> items;
  for (const auto& t : tensors) {
    items.emplace_back(t.contiguous().cpu());
  }
  std::vector<char> data = torch::pickle_save(c10::ivalue::Tuple::create(std::move(items)));
  std::ofstream file(path, std::ios::binary);
  file.write(data.data(), static_cast<std::streamsize>(data.size()));
  if (!file) {
    throw std::runtime_error("cannot write " + path);
  }
}

// A head returns a tensor ('out', 'features'), a tuple ('both') or a list ('full').
std::vector<at::Tensor> flatten(const c10::IValue& value) {
  if (value.isTensor()) {
    return {value.toTensor()};
  }
  std::vector<at::Tensor> out;
  if (value.isTuple()) {
    for (const auto& item : value.toTupleRef().elements()) {
      out.push_back(item.toTensor());
    }
  } else {
    for (const auto& item : value.toTensorList()) {
      out.push_back(item);
    }
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: " << argv[0] << " MODEL(.aoti.pt2|.pt) INPUT.pt OUTPUT.pt\n";
    return 2;
  }
  const std::string model_path = argv[1];
  // AOTInductor checks input shapes only when asked: a package compiled for batch 1 would
  // otherwise read a batch of 3 without complaint. Asked for fixed-batch packages only
  // (<mode>.aoti.b<N>.pt2): in torch 2.14 the check also puts a wrong upper bound on a dynamic
  // batch (15 for CIFAR ResNet-18, whose any-batch package is correct at 64).
  if (model_path.find(".aoti.b") != std::string::npos) {
    setenv("AOTI_RUNTIME_CHECK_INPUTS", "1", 0);
  }
  try {
    at::Tensor x = read_tensor(argv[2]);
    std::vector<at::Tensor> outputs;
    c10::InferenceMode guard;
    if (ends_with(model_path, ".pt2")) {
      torch::inductor::AOTIModelPackageLoader loader(model_path);
      outputs = loader.run({x});
    } else if (ends_with(model_path, ".pt")) {
      torch::jit::Module module = torch::jit::load(model_path);
      module.eval();
      outputs = flatten(module.forward({x}));
    } else {
      std::cerr << "error: " << model_path << ": expected a .aoti.pt2 or .pt file\n";
      return 2;
    }
    write_tensors(argv[3], outputs);
    std::cout << model_path << ": " << outputs.size() << " output(s), input "
              << x.sizes() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
