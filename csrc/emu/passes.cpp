// libresbm_cuda_emu: csrc/cuda/passes.cu compiled for the CPU emulator.
#include "cuda/passes.cu"
