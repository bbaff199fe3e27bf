// libresbm_cuda_emu: csrc/cuda/codec_cuda.cu compiled for the CPU emulator.
#include "cuda/codec_cuda.cu"
