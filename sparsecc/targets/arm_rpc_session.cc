// One TVM RPC session on an aarch64 device (cross-compiled by sparsecc.targets.qemu, run under qemu-aarch64).
//
//   arm_rpc_session FD WORKDIR
//
// FD is a connected socket on which the RPC handshake (magic, keys) is already done; the session's
// protocol is TVM's own, served by libtvm_runtime's "rpc.ServerLoop". What a server must provide
// besides is registered here, as TVM's Python server registers it: "tvm.rpc.server.workpath" (where
// uploads go; libtvm_runtime's upload, download and remove use it) and "tvm.rpc.server.load_module"
// (a shared library in the work folder, loaded with the aarch64 runtime). The process ends when the
// client closes the session.

#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>

namespace ffi = tvm::ffi;

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s SOCKET_FD WORKDIR\n", argv[0]);
    return 2;
  }
  const int fd = std::atoi(argv[1]);
  const std::string work = argv[2];
  try {
    ffi::Function::SetGlobal("tvm.rpc.server.workpath", ffi::Function::FromTyped([work](ffi::String name) {
                               return ffi::String(work + "/" + std::string(name));
                             }),
                             /*can_override=*/true);
    ffi::Function::SetGlobal("tvm.rpc.server.load_module", ffi::Function::FromTyped([work](ffi::String name) {
                               return ffi::Module::LoadFromFile(work + "/" + std::string(name));
                             }),
                             /*can_override=*/true);
    auto loop = ffi::Function::GetGlobal("rpc.ServerLoop");
    if (!loop.has_value()) {
      std::fprintf(stderr, "libtvm_runtime has no rpc.ServerLoop\n");
      return 1;
    }
    (*loop)(fd);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rpc session failed: %s\n", e.what());
    return 1;
  }
  return 0;
}
