// Error reporting of libresbm_cuda, shared by its translation units: the
// thread-local message behind resbm_last_error() and the launch check. Defined
// in codec_cuda.cu.
#pragma once

namespace resbm_cuda_detail {

extern thread_local char g_error[512];

// Writes "<fn>: <message>" to g_error and returns `code`.
int fail(int code, const char* fn, const char* fmt, ...) __attribute__((format(printf, 3, 4)));

// RESBM_OK, or RESBM_ERR_CUDA naming `kernel` if its launch failed.
int launch_status(const char* fn, const char* kernel);

}  // namespace resbm_cuda_detail
