// What the standalone probes (cuda_stream_bw.cu, cuda_link.cu) share: the error check and one launch's time in a
// CUDA graph of back-to-back launches.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#define CK(x)                                                                 \
    do {                                                                      \
        cudaError_t e_ = (x);                                                 \
        if (e_ != cudaSuccess) {                                              \
            std::printf("%s: %s\n", #x, cudaGetErrorString(e_));              \
            std::exit(1);                                                     \
        }                                                                     \
    } while (0)

// One launch's time in us: `reps` launches captured in a graph (launch(stream, r % n_buf) for r < reps), best of 5
// replays after one.
template <class F>
float per_launch_us(F launch, int n_buf, int reps) {
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    for (int r = 0; r < reps; ++r) launch(s, r % n_buf);
    CK(cudaStreamEndCapture(s, &g));
    CK(cudaGraphInstantiate(&ge, g, 0));
    CK(cudaGraphLaunch(ge, s));
    CK(cudaStreamSynchronize(s));
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    float best = 1e30f;
    for (int t = 0; t < 5; ++t) {
        CK(cudaEventRecord(a, s));
        CK(cudaGraphLaunch(ge, s));
        CK(cudaEventRecord(b, s));
        CK(cudaStreamSynchronize(s));
        float ms;
        CK(cudaEventElapsedTime(&ms, a, b));
        best = std::min(best, ms * 1000.0f / reps);
    }
    cudaEventDestroy(a), cudaEventDestroy(b);
    cudaGraphExecDestroy(ge), cudaGraphDestroy(g), cudaStreamDestroy(s);
    return best;
}
