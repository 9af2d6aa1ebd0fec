// Runs a Relax VM shared library (exported by tvm.compile) on the device, without Python.
//
// rwdeploy cross-builds this for aarch64 and runs it under qemu with the instruction-count
// plugin: counting a run with N inferences and one with M, the difference divided by N - M is
// the cost of one inference with start-up (library load, VM set-up, the warm-up call) removed.
//
// Usage: vm_runner LIB.so INPUT.bin SHAPE ITERS [OUTPUT.bin]
//   INPUT.bin: raw float32 in C order; SHAPE: comma-separated dims, e.g. 1,3,32,32.
//   One warm-up call always runs first, then ITERS timed calls (ITERS may be 0).
//   OUTPUT.bin (optional): the float32 output of the last call, for checking against torch.
// Prints "output_shape=..." and "mean_ms=..." on stdout; exits non-zero with a message on error.
// RWDEPLOY_VM_FUNCTION (environment) names the Relax function to run instead of "main".
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

// Host memory for the input tensor; TVM kernels assume 64-byte alignment.
struct AlignedHostAlloc {
  void AllocData(DLTensor* t) {
    size_t bytes = (ffi::GetDataSize(*t) + 63) / 64 * 64;
    t->data = std::aligned_alloc(64, bytes == 0 ? 64 : bytes);
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

std::vector<int64_t> ParseShape(const std::string& text) {
  std::vector<int64_t> dims;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) dims.push_back(std::stoll(item));
  return dims;
}

ffi::Tensor FirstTensor(const ffi::Any& result) {
  if (auto t = result.as<ffi::Tensor>()) return *t;
  if (auto arr = result.as<ffi::Array<ffi::Any>>()) {
    if (!arr->empty()) return FirstTensor((*arr)[0]);
  }
  throw std::runtime_error("main returned no float32 tensor");
}

int Run(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: %s LIB.so INPUT.bin SHAPE ITERS [OUTPUT.bin]\n", argv[0]);
    return 2;
  }
  std::vector<int64_t> shape = ParseShape(argv[3]);
  int iters = std::atoi(argv[4]);

  size_t numel = 1;
  for (int64_t d : shape) numel *= static_cast<size_t>(d);
  std::vector<float> input(numel);
  std::ifstream in(argv[2], std::ios::binary);
  if (!in.read(reinterpret_cast<char*>(input.data()), numel * sizeof(float))) {
    std::fprintf(stderr, "cannot read %zu float32 values from %s\n", numel, argv[2]);
    return 2;
  }

  ffi::Module lib = ffi::Module::LoadFromFile(argv[1]);
  ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
  // vm_initialization(device_type, device_id, allocator_type) for the compute device and
  // again for the host: kDLCPU both times, allocator 2 = pooled.
  vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2,
                                               static_cast<int>(kDLCPU), 0, 2);
  const char* fname = std::getenv("RWDEPLOY_VM_FUNCTION");
  ffi::Function fmain = vm->GetFunction(fname != nullptr ? fname : "main").value();

  DLDevice cpu{kDLCPU, 0};
  ffi::Tensor x = ffi::Tensor::FromNDAlloc(AlignedHostAlloc(), ffi::Shape(shape),
                                           DLDataType{kDLFloat, 32, 1}, cpu);
  std::memcpy(x.data_ptr(), input.data(), numel * sizeof(float));

  ffi::Tensor y = FirstTensor(fmain(x));  // warm-up: first-call allocations happen here
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) y = FirstTensor(fmain(x));
  auto t1 = std::chrono::steady_clock::now();

  std::string dims;
  for (int i = 0; i < y.ndim(); ++i) dims += (i ? "," : "") + std::to_string(y.shape()[i]);
  std::printf("output_shape=%s\n", dims.c_str());
  double ms = std::chrono::duration<double, std::milli>(t1 - t0).count();
  std::printf("mean_ms=%.4f iters=%d\n", iters > 0 ? ms / iters : 0.0, iters);

  if (argc > 5) {
    DLDataType dt = y.dtype();
    if (dt.code != kDLFloat || dt.bits != 32) {
      std::fprintf(stderr, "output is not float32\n");
      return 2;
    }
    std::ofstream out(argv[5], std::ios::binary);
    out.write(static_cast<const char*>(y.data_ptr()), y.numel() * sizeof(float));
    if (!out) {
      std::fprintf(stderr, "cannot write %s\n", argv[5]);
      return 2;
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(argc, argv);
  } catch (const std::exception& err) {
    std::fprintf(stderr, "vm_runner: %s\n", err.what());
    return 1;
  }
}
