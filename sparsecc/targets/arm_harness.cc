// sparsecc aarch64 harness: load a TVM-exported shared library with the aarch64 TVM runtime, run one
// function on tensors read from files, write the results to a file. Cross-compiled by
// sparsecc/targets/qemu.py and run under qemu-aarch64 user-mode emulation (or on a real board).
//
// Usage:
//   harness call <lib.so> <function> <out.bin> <repeat> <in.bin>...
//       Calls <function> of the library with every tensor of the input files (in order) as an argument,
//       then writes all those tensors (destination-passing kernels write their outputs in place).
//   harness vm <lib.so> <function> <out.bin> <repeat> <in.bin>...
//       Loads the library as a Relax VM executable, calls <function> with the tensors and writes the
//       returned tensor, or the tensors of a returned (nested) tuple flattened in order.
// <repeat> > 1 runs the call that many times and prints "time_ms <median>" (wall clock in this process).
//
// Tensor file format (little-endian), written by sparsecc.targets.qemu.write_tensors:
//   8 bytes magic "SPCCTEN1", uint32 count, then per tensor:
//   uint8 dtype code (DLDataTypeCode), uint8 bits, uint16 lanes, uint32 ndim, int64 shape[ndim],
//   uint64 nbytes, nbytes of C-contiguous data.
#include <dlpack/dlpack.h>
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

struct AlignedAlloc {
  void AllocData(DLTensor* t) {
    size_t n = ffi::GetDataSize(*t);
    t->data = std::aligned_alloc(64, std::max<size_t>(64, (n + 63) / 64 * 64));
    if (t->data == nullptr) throw std::runtime_error("out of memory");
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

static void read_exact(FILE* f, void* dst, size_t n, const std::string& path) {
  if (n && std::fread(dst, 1, n, f) != n) throw std::runtime_error("truncated tensor file " + path);
}

static std::vector<ffi::Tensor> read_tensors(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) throw std::runtime_error("cannot open " + path);
  char magic[8];
  read_exact(f, magic, 8, path);
  if (std::memcmp(magic, "SPCCTEN1", 8) != 0) throw std::runtime_error("bad magic in " + path);
  uint32_t count;
  read_exact(f, &count, 4, path);
  std::vector<ffi::Tensor> out;
  for (uint32_t i = 0; i < count; ++i) {
    uint8_t code, bits;
    uint16_t lanes;
    uint32_t ndim;
    read_exact(f, &code, 1, path);
    read_exact(f, &bits, 1, path);
    read_exact(f, &lanes, 2, path);
    read_exact(f, &ndim, 4, path);
    std::vector<int64_t> shape(ndim);
    read_exact(f, shape.data(), 8 * ndim, path);
    uint64_t nbytes;
    read_exact(f, &nbytes, 8, path);
    DLDataType dt{code, bits, lanes};
    ffi::Tensor t = ffi::Tensor::FromNDAlloc(AlignedAlloc(), ffi::ShapeView(shape.data(), shape.size()), dt,
                                             DLDevice{kDLCPU, 0});
    if (ffi::GetDataSize(*t.GetDLTensorPtr()) != nbytes) throw std::runtime_error("size mismatch in " + path);
    read_exact(f, t.data_ptr(), nbytes, path);
    out.push_back(t);
  }
  std::fclose(f);
  return out;
}

static void write_tensors(const std::string& path, const std::vector<ffi::Tensor>& ts) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) throw std::runtime_error("cannot write " + path);
  std::fwrite("SPCCTEN1", 1, 8, f);
  uint32_t count = ts.size();
  std::fwrite(&count, 4, 1, f);
  for (const ffi::Tensor& t : ts) {
    const DLTensor* d = t.GetDLTensorPtr();
    uint8_t code = d->dtype.code, bits = d->dtype.bits;
    uint16_t lanes = d->dtype.lanes;
    uint32_t ndim = d->ndim;
    std::fwrite(&code, 1, 1, f);
    std::fwrite(&bits, 1, 1, f);
    std::fwrite(&lanes, 2, 1, f);
    std::fwrite(&ndim, 4, 1, f);
    std::fwrite(d->shape, 8, ndim, f);
    uint64_t nbytes = ffi::GetDataSize(*d);
    std::fwrite(&nbytes, 8, 1, f);
    if (!ffi::IsContiguous(*d)) throw std::runtime_error("result tensor is not contiguous");
    std::fwrite(static_cast<char*>(d->data) + d->byte_offset, 1, nbytes, f);
  }
  if (std::fclose(f) != 0) throw std::runtime_error("cannot write " + path);
}

static void flatten(const ffi::Any& v, std::vector<ffi::Tensor>* out) {
  if (auto t = v.as<ffi::Tensor>()) {
    out->push_back(*t);
  } else if (auto a = v.as<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& e : *a) flatten(e, out);
  } else {
    throw std::runtime_error("result is neither a tensor nor a tuple (type " + v.GetTypeKey() + ")");
  }
}

int main(int argc, char** argv) {
  if (argc < 7) {
    std::fprintf(stderr, "usage: %s call|vm <lib.so> <function> <out.bin> <repeat> <in.bin>...\n", argv[0]);
    return 2;
  }
  try {
    std::string mode = argv[1], lib = argv[2], fname = argv[3], out_path = argv[4];
    int repeat = std::max(1, std::atoi(argv[5]));
    std::vector<ffi::Tensor> args;
    for (int i = 6; i < argc; ++i) {
      std::vector<ffi::Tensor> ts = read_tensors(argv[i]);
      args.insert(args.end(), ts.begin(), ts.end());
    }
    ffi::Module mod = ffi::Module::LoadFromFile(lib);
    ffi::Function fn;
    if (mode == "vm") {
      ffi::Module vm = mod->GetFunction("vm_load_executable", true).value()().cast<ffi::Module>();
      // CPU device (type 1, id 0) with the pooled allocator (2), as tvm.relax.VirtualMachine(..., tvm.cpu()).
      vm->GetFunction("vm_initialization", true).value()(1, 0, 2);
      auto f = vm->GetFunction(fname, true);
      if (!f.has_value()) throw std::runtime_error("the VM executable has no function " + fname);
      fn = *f;
      mod = vm;
    } else if (mode == "call") {
      auto f = mod->GetFunction(fname, true);
      if (!f.has_value()) throw std::runtime_error("the library has no function " + fname);
      fn = *f;
    } else {
      throw std::runtime_error("unknown mode " + mode);
    }
    std::vector<ffi::AnyView> views(args.begin(), args.end());
    std::vector<double> times;
    ffi::Any result;
    for (int r = 0; r < repeat; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      fn.CallPacked(views.data(), static_cast<int32_t>(views.size()), &result);
      auto t1 = std::chrono::steady_clock::now();
      times.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    }
    std::vector<ffi::Tensor> outs;
    if (mode == "vm") {
      flatten(result, &outs);
    } else {
      outs = args;
    }
    write_tensors(out_path, outs);
    if (repeat > 1) {
      std::sort(times.begin(), times.end());
      std::printf("time_ms %.6f\n", times[times.size() / 2]);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "sparsecc harness error: %s\n", e.what());
    return 1;
  }
  return 0;
}
