// ds4d._cuda: the one pybind11 binding file of the CUDA backend.
//
// Owns the Python face of the decode kernels (ds4_cuda.h) and the few runtime objects Python needs to drive them:
// device buffers (Buffer: allocate, upload, download), streams, events, and captured graphs. Kernel entry points
// take device addresses as integers (Buffer.ptr + byte offset) so that the caller lays out its own memory, and
// only enqueue work, so a sequence of calls between begin_capture and end_capture becomes one replayable graph.
// Argument errors become ValueError with the kernel's reason; CUDA errors become RuntimeError. Called by the
// tests and benchmarks now, by ds4d.ops.cuda in the integration.
#include <cuda_runtime.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <string>
#include <vector>

#include "ds4_cuda.h"

namespace py = pybind11;

namespace {

void check(cudaError_t e, const char* what) {
    if (e == cudaSuccess) return;
    if (e == cudaErrorInvalidValue && *ds4_cuda_error_message()) throw py::value_error(ds4_cuda_error_message());
    cudaGetLastError();  // a launch error is sticky only when the context is broken; clear the rest
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

template <typename T>
T* dev(uintptr_t p) {
    return reinterpret_cast<T*>(p);
}
cudaStream_t st(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// ---- runtime objects -------------------------------------------------------------------------------------------

struct Buffer {
    void* ptr = nullptr;
    size_t nbytes = 0;
    void* staging = nullptr;         // pinned host memory of upload_async, made on first use
    size_t staged = 0;
    cudaEvent_t copied = nullptr;    // the last asynchronous upload's copy out of `staging`
    explicit Buffer(size_t n) : nbytes(n) {
        // Rounded up to 256 bytes: kernels may read up to the next 16-byte boundary past the last weight row.
        check(cudaMalloc(&ptr, (n + 255) / 256 * 256 + 256), "cudaMalloc");
    }
    ~Buffer() {
        if (ptr) cudaFree(ptr);
        if (staging) cudaFreeHost(staging);
        if (copied) cudaEventDestroy(copied);
    }
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;

    void range(size_t offset, size_t n) const {
        if (offset > nbytes || n > nbytes - offset)
            throw py::value_error("range of " + std::to_string(n) + " bytes at offset " + std::to_string(offset) +
                                  " is outside the buffer of " + std::to_string(nbytes));
    }
    void upload(const py::array& a, size_t offset) {
        if (!(a.flags() & py::array::c_style)) throw py::value_error("upload: the array must be C-contiguous");
        range(offset, a.nbytes());
        const void* src = a.data();
        py::gil_scoped_release nogil;
        check(cudaMemcpy((char*)ptr + offset, src, a.nbytes(), cudaMemcpyHostToDevice), "upload");
    }
    // The copy is enqueued on the stream from pinned memory and the host goes on (a synchronous cudaMemcpy also
    // waits for the device to go idle). Only the previous asynchronous copy from this buffer is waited for.
    void upload_async(const py::array& a, size_t offset, uintptr_t stream) {
        if (!(a.flags() & py::array::c_style)) throw py::value_error("upload: the array must be C-contiguous");
        const size_t n = a.nbytes();
        range(offset, n);
        if (copied) check(cudaEventSynchronize(copied), "upload_async");
        else check(cudaEventCreateWithFlags(&copied, cudaEventDisableTiming), "cudaEventCreate");
        if (staged < n) {
            if (staging) cudaFreeHost(staging);
            staging = nullptr, staged = 0;
            check(cudaMallocHost(&staging, n), "cudaMallocHost");
            staged = n;
        }
        std::memcpy(staging, a.data(), n);
        check(cudaMemcpyAsync((char*)ptr + offset, staging, n, cudaMemcpyHostToDevice, st(stream)), "upload_async");
        check(cudaEventRecord(copied, st(stream)), "upload_async");
    }
    py::array download(const py::object& dtype, const std::vector<py::ssize_t>& shape, size_t offset) {
        py::array out(py::dtype::from_args(dtype), shape);
        range(offset, out.nbytes());
        void* dst = out.mutable_data();
        const size_t n = out.nbytes();
        py::gil_scoped_release nogil;
        check(cudaMemcpy(dst, (char*)ptr + offset, n, cudaMemcpyDeviceToHost), "download");
        return out;
    }
};

// Pinned host memory that kernels write through its device address (the sampler: a step's ids), collected by the
// host after an event recorded behind them (record), so that the host can launch the next step before it waits
// for this one's (wait). No copy joins the stream: each costs the step a copy engine's start (3-8 us, H200).
struct HostSlot {
    void* host = nullptr;
    void* dev = nullptr;
    size_t cap = 0, n = 0;
    cudaEvent_t done = nullptr;
    explicit HostSlot(size_t bytes) : cap(bytes) {
        check(cudaHostAlloc(&host, cap, cudaHostAllocMapped), "cudaHostAlloc");
        check(cudaHostGetDevicePointer(&dev, host, 0), "cudaHostGetDevicePointer");
        check(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), "cudaEventCreate");
    }
    ~HostSlot() {
        if (host) cudaFreeHost(host);
        if (done) cudaEventDestroy(done);
    }
    HostSlot(const HostSlot&) = delete;
    HostSlot& operator=(const HostSlot&) = delete;
    void record(size_t bytes, uintptr_t stream) {
        if (bytes > cap) throw py::value_error("record: " + std::to_string(bytes) + " bytes in a slot of " +
                                               std::to_string(cap));
        n = bytes;
        check(cudaEventRecord(done, st(stream)), "record");
    }
    py::array wait(const py::object& dtype, const std::vector<py::ssize_t>& shape) {
        py::array out(py::dtype::from_args(dtype), shape);
        if ((size_t)out.nbytes() > n) throw py::value_error("wait: more bytes than were recorded");
        {
            py::gil_scoped_release nogil;
            check(cudaEventSynchronize(done), "wait");
        }
        std::memcpy(out.mutable_data(), host, out.nbytes());
        return out;
    }
};

struct Stream {
    cudaStream_t s = nullptr;
    Stream() { check(cudaStreamCreate(&s), "cudaStreamCreate"); }
    ~Stream() {
        if (s) cudaStreamDestroy(s);
    }
    void synchronize() {
        py::gil_scoped_release nogil;
        check(cudaStreamSynchronize(s), "synchronize");
    }
};

struct Event {
    cudaEvent_t e = nullptr;
    Event() { check(cudaEventCreate(&e), "cudaEventCreate"); }
    ~Event() {
        if (e) cudaEventDestroy(e);
    }
};

struct Graph {
    cudaGraph_t g = nullptr;
    cudaGraphExec_t exec = nullptr;
    ~Graph() {
        if (exec) cudaGraphExecDestroy(exec);
        if (g) cudaGraphDestroy(g);
    }
    size_t nodes() const {
        size_t n = 0;
        cudaGraphGetNodes(g, nullptr, &n);
        return n;
    }
};

py::dict device_info() {
    int dev = 0;
    check(cudaGetDevice(&dev), "cudaGetDevice");
    cudaDeviceProp p;
    check(cudaGetDeviceProperties(&p, dev), "cudaGetDeviceProperties");
    int clock_khz = 0, mem_clock_khz = 0;
    cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, dev);
    cudaDeviceGetAttribute(&mem_clock_khz, cudaDevAttrMemoryClockRate, dev);
    size_t free_b = 0, total_b = 0;
    check(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
    py::dict d;
    d["device"] = dev;
    d["name"] = std::string(p.name);
    d["cc"] = p.major * 10 + p.minor;
    d["sms"] = p.multiProcessorCount;
    d["l2_bytes"] = p.l2CacheSize;
    d["smem_per_block_optin"] = p.sharedMemPerBlockOptin;
    d["smem_per_sm"] = p.sharedMemPerMultiprocessor;
    d["total_bytes"] = total_b;
    d["free_bytes"] = free_b;
    d["clock_mhz"] = clock_khz / 1000;
    d["mem_clock_mhz"] = mem_clock_khz / 1000;
    d["mem_bus_bits"] = p.memoryBusWidth;
    return d;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
    m.doc() =
        "CUDA decode kernels of ds4d (ds4_cuda.h): matrix-vector products for every GGUF weight type of DS4 Flash, "
        "fused MoE, decode attention with sinks, norms, hyper-connections, RoPE, the FP8 KV round trip, routing; "
        "plus device buffers, streams, events and graph capture to drive them. Pointers are integers.";

    m.def("device_count", [] {
        int n = 0;
        return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
    }, "Number of CUDA devices (0 when there is no driver or device).");
    m.def("set_device", [](int d) { check(cudaSetDevice(d), "cudaSetDevice"); }, py::arg("device"));
    m.def("init", [] { check(ds4_cuda_init(), "init"); }, "Prepare the current device (idempotent).");
    m.def("device_info", &device_info, "Name, compute capability, SMs, L2, memory of the current device.");
#if defined(DS4_CUTLASS)
    m.attr("has_cutlass") = true;   // Q8_0 prefill products on wgmma (gemm_sm90.cu) on sm_90 devices
#else
    m.attr("has_cutlass") = false;
#endif
    m.def("set_pdl", &ds4_cuda_set_pdl, py::arg("on"), "Programmatic dependent launch on/off (sm_90+).");
    m.def("pdl", &ds4_cuda_pdl, "Whether launches use programmatic dependent launch.");
    m.def("memcpy", [](uintptr_t dst, uintptr_t src, size_t nbytes, uintptr_t stream) {
        check(cudaMemcpyAsync(dev<void>(dst), dev<const void>(src), nbytes, cudaMemcpyDeviceToDevice, st(stream)),
              "memcpy");
    }, py::arg("dst"), py::arg("src"), py::arg("nbytes"), py::arg("stream") = 0, "Device-to-device copy (enqueued).");
    m.def("synchronize", [] {
        py::gil_scoped_release nogil;
        check(cudaDeviceSynchronize(), "synchronize");
    });

    py::class_<Buffer>(m, "Buffer", "Device memory (cudaMalloc), freed with the object.", py::dynamic_attr())
        .def(py::init<size_t>(), py::arg("nbytes"))
        .def_property_readonly("ptr", [](const Buffer& b) { return (uintptr_t)b.ptr; })
        .def_readonly("nbytes", &Buffer::nbytes)
        .def("upload", &Buffer::upload, py::arg("array"), py::arg("offset") = 0,
             "Copy a C-contiguous numpy array to ptr + offset (synchronous).")
        .def("upload_async", &Buffer::upload_async, py::arg("array"), py::arg("offset"), py::arg("stream"),
             "Copy a C-contiguous numpy array to ptr + offset in stream order, through pinned memory.")
        .def("download", &Buffer::download, py::arg("dtype"), py::arg("shape"), py::arg("offset") = 0,
             "A new numpy array of dtype and shape copied from ptr + offset (synchronous).")
        .def("memset", [](Buffer& b, int value, size_t offset, py::object n) {
            const size_t len = n.is_none() ? b.nbytes - offset : n.cast<size_t>();
            b.range(offset, len);
            check(cudaMemset((char*)b.ptr + offset, value, len), "memset");
        }, py::arg("value"), py::arg("offset") = 0, py::arg("nbytes") = py::none())
        .def("fill_random", [](Buffer& b, int type, uint64_t seed, size_t offset, py::object n, uintptr_t stream) {
            const size_t len = n.is_none() ? b.nbytes - offset : n.cast<size_t>();
            b.range(offset, len);
            check(ds4_cuda_fill_random(st(stream), (char*)b.ptr + offset, len, type, seed), "fill_random");
        }, py::arg("type"), py::arg("seed"), py::arg("offset") = 0, py::arg("nbytes") = py::none(),
           py::arg("stream") = 0, "Valid random blocks of a GGUF type (finite scales): benchmark weights.");

    py::class_<HostSlot>(m, "HostSlot", "Pinned host memory that kernels write through its device address.")
        .def(py::init<size_t>(), py::arg("nbytes"))
        .def_readonly("nbytes", &HostSlot::cap)
        .def_property_readonly("ptr", [](const HostSlot& h) { return (uintptr_t)h.dev; })
        .def("record", &HostSlot::record, py::arg("nbytes"), py::arg("stream"),
             "Mark nbytes as written by the work enqueued on the stream so far (an event); the host goes on.")
        .def("wait", &HostSlot::wait, py::arg("dtype"), py::arg("shape"),
             "Wait for that work, then return the bytes as a new numpy array.");
    py::class_<Stream>(m, "Stream", "A CUDA stream (blocking: ordered with the legacy default stream).")
        .def(py::init<>())
        .def_property_readonly("ptr", [](const Stream& s) { return (uintptr_t)s.s; })
        .def("synchronize", &Stream::synchronize);

    py::class_<Event>(m, "Event", "A timing event.")
        .def(py::init<>())
        .def("record", [](Event& e, uintptr_t stream, bool external) {
            // external: while the stream is being captured, a node of the graph (each replay records it again)
            check(cudaEventRecordWithFlags(e.e, st(stream), external ? cudaEventRecordExternal : 0), "record");
        }, py::arg("stream") = 0, py::arg("external") = false)
        .def("synchronize", [](Event& e) {
            py::gil_scoped_release nogil;
            check(cudaEventSynchronize(e.e), "event synchronize");
        })
        .def("wait", [](Event& e, uintptr_t stream) {
            // Work enqueued on `stream` from now on runs after the work before this event's last record (a graph
            // edge from the recording stream while both are being captured).
            check(cudaStreamWaitEvent(st(stream), e.e, 0), "wait");
        }, py::arg("stream"));
    m.def("elapsed_ms", [](const Event& a, const Event& b) {
        float ms = 0;
        check(cudaEventElapsedTime(&ms, a.e, b.e), "elapsed_ms");
        return ms;
    }, py::arg("start"), py::arg("end"));

    py::class_<Graph>(m, "Graph", "An instantiated CUDA graph (from end_capture).")
        .def("launch", [](Graph& g, uintptr_t stream) { check(cudaGraphLaunch(g.exec, st(stream)), "graph launch"); },
             py::arg("stream"))
        .def_property_readonly("nodes", &Graph::nodes);
    m.def("begin_capture", [](uintptr_t stream) {
        check(cudaStreamBeginCapture(st(stream), cudaStreamCaptureModeRelaxed), "begin_capture");
    }, py::arg("stream"), "Start recording the stream's work into a graph (nothing runs until launch).");
    m.def("end_capture", [](uintptr_t stream) {
        auto g = std::make_unique<Graph>();
        check(cudaStreamEndCapture(st(stream), &g->g), "end_capture");
        check(cudaGraphInstantiate(&g->exec, g->g, 0), "graph instantiate");
        return g;
    }, py::arg("stream"));

    // ---- kernels (see ds4_cuda.h for the exact semantics of each) --------------------------------------------
    m.def("matvec", [](uintptr_t s, uintptr_t y, int64_t y_stride, uintptr_t w, int type, int64_t rows, int64_t cols,
                       uintptr_t x, int64_t x_stride, int n_tok, int groups, uintptr_t work, bool work_filled) {
        check(ds4_cuda_matvec(st(s), dev<float>(y), y_stride, dev<void>(w), type, rows, cols, dev<const float>(x),
                              x_stride, n_tok, groups, dev<void>(work), work_filled), "matvec");
    }, py::arg("stream"), py::arg("y"), py::arg("y_stride"), py::arg("w"), py::arg("type"), py::arg("rows"),
       py::arg("cols"), py::arg("x"), py::arg("x_stride"), py::arg("n_tok"), py::arg("groups") = 1,
       py::arg("work") = 0, py::arg("work_filled") = false);
    m.def("matvec_normed", [](uintptr_t s, uintptr_t y, int64_t y_stride, uintptr_t w, int type, int64_t rows,
                              int64_t cols, uintptr_t x, int64_t x_stride, int n_tok, uintptr_t norm_w, float eps,
                              uintptr_t xn, uintptr_t work) {
        check(ds4_cuda_matvec_normed(st(s), dev<float>(y), y_stride, dev<void>(w), type, rows, cols,
                                     dev<const float>(x), x_stride, n_tok, dev<const float>(norm_w), eps,
                                     dev<float>(xn), dev<void>(work)), "matvec_normed");
    }, py::arg("stream"), py::arg("y"), py::arg("y_stride"), py::arg("w"), py::arg("type"), py::arg("rows"),
       py::arg("cols"), py::arg("x"), py::arg("x_stride"), py::arg("n_tok"), py::arg("norm_w"), py::arg("eps"),
       py::arg("xn") = 0, py::arg("work") = 0);
    m.def("matvec_pair", [](uintptr_t s, const std::vector<uintptr_t>& ys0, const std::vector<int64_t>& rows0,
                            uintptr_t w0, int type0, const std::vector<uintptr_t>& ys1,
                            const std::vector<int64_t>& rows1, uintptr_t w1, int type1, int64_t cols, uintptr_t x,
                            int64_t x_stride, int n_tok) {
        if (ys0.size() != rows0.size() || ys1.size() != rows1.size())
            throw py::value_error("matvec_pair: one y per part");
        std::vector<float*> o0, o1;
        for (uintptr_t y : ys0) o0.push_back(dev<float>(y));
        for (uintptr_t y : ys1) o1.push_back(dev<float>(y));
        const ds4_cuda_products p0{o0.data(), rows0.data(), (int)o0.size(), dev<void>(w0), type0};
        const ds4_cuda_products p1{o1.data(), rows1.data(), (int)o1.size(), dev<void>(w1), type1};
        check(ds4_cuda_matvec_pair(st(s), &p0, &p1, cols, dev<const float>(x), x_stride, n_tok), "matvec_pair");
    }, py::arg("stream"), py::arg("ys0"), py::arg("rows0"), py::arg("w0"), py::arg("type0"), py::arg("ys1"),
       py::arg("rows1"), py::arg("w1"), py::arg("type1"), py::arg("cols"), py::arg("x"), py::arg("x_stride"),
       py::arg("n_tok"));
    m.def("matvec_pair_ok", &ds4_cuda_matvec_pair_ok, py::arg("type0"), py::arg("type1"), py::arg("cols"),
          py::arg("n_tok"));
    m.def("matvec_parts", [](uintptr_t s, const std::vector<uintptr_t>& ys, const std::vector<int64_t>& part_rows,
                             uintptr_t w, int type, int64_t cols, uintptr_t x, int64_t x_stride, int n_tok,
                             uintptr_t work, bool work_filled) {
        if (ys.size() != part_rows.size()) throw py::value_error("matvec_parts: one y per part");
        std::vector<float*> outs;
        for (uintptr_t y : ys) outs.push_back(dev<float>(y));
        check(ds4_cuda_matvec_parts(st(s), outs.data(), part_rows.data(), (int)outs.size(), dev<void>(w), type, cols,
                                    dev<const float>(x), x_stride, n_tok, dev<void>(work), work_filled),
              "matvec_parts");
    }, py::arg("stream"), py::arg("ys"), py::arg("part_rows"), py::arg("w"), py::arg("type"), py::arg("cols"),
       py::arg("x"), py::arg("x_stride"), py::arg("n_tok"), py::arg("work") = 0, py::arg("work_filled") = false);
    m.def("matvec_quantizing", [](uintptr_t s, uintptr_t y, uintptr_t w, int type, int64_t rows, int64_t cols,
                                  uintptr_t x, int n_tok, uintptr_t q_x, int q_rows, int64_t q_cols, int q_type,
                                  uintptr_t q_work) {
        check(ds4_cuda_matvec_quantizing(st(s), dev<float>(y), dev<void>(w), type, rows, cols, dev<const float>(x),
                                         n_tok, dev<const float>(q_x), q_rows, q_cols, q_type, dev<void>(q_work)),
              "matvec_quantizing");
    }, py::arg("stream"), py::arg("y"), py::arg("w"), py::arg("type"), py::arg("rows"), py::arg("cols"), py::arg("x"),
       py::arg("n_tok"), py::arg("q_x"), py::arg("q_rows"), py::arg("q_cols"), py::arg("q_type"), py::arg("q_work"));
    m.def("matvec_work_bytes", &ds4_cuda_matvec_work_bytes, py::arg("type"), py::arg("n_tok"), py::arg("cols"),
          py::arg("groups") = 1);
    m.def("quantize_act", [](uintptr_t s, uintptr_t qs, uintptr_t d, uintptr_t bsums, uintptr_t x, int64_t x_stride,
                             int n_tok, int64_t cols, int kind) {
        check(ds4_cuda_quantize_act(st(s), dev<int8_t>(qs), dev<float>(d), dev<int16_t>(bsums), dev<const float>(x),
                                    x_stride, n_tok, cols, kind), "quantize_act");
    }, py::arg("stream"), py::arg("qs"), py::arg("d"), py::arg("bsums"), py::arg("x"), py::arg("x_stride"),
       py::arg("n_tok"), py::arg("cols"), py::arg("kind"));
    m.def("gemm_ok", &ds4_cuda_gemm_ok, py::arg("type"), py::arg("cols"));
    m.def("gemm", [](uintptr_t s, uintptr_t y, int64_t y_stride, uintptr_t w, int type, int64_t rows, int64_t cols,
                     uintptr_t x, int64_t x_stride, int n_tok, int groups, uintptr_t work, int tile) {
        check(ds4_cuda_gemm(st(s), dev<float>(y), y_stride, dev<void>(w), type, rows, cols, dev<const float>(x),
                            x_stride, n_tok, groups, dev<void>(work), tile), "gemm");
    }, py::arg("stream"), py::arg("y"), py::arg("y_stride"), py::arg("w"), py::arg("type"), py::arg("rows"),
       py::arg("cols"), py::arg("x"), py::arg("x_stride"), py::arg("n_tok"), py::arg("groups"), py::arg("work"),
       py::arg("tile") = 0);
    m.def("gemm_work_bytes", &ds4_cuda_gemm_work_bytes, py::arg("type"), py::arg("n_tok"), py::arg("rows"),
          py::arg("cols"), py::arg("groups") = 1);
    m.def("moe_grouped", [](uintptr_t s, uintptr_t out, int64_t out_stride, uintptr_t h, int64_t h_stride,
                            uintptr_t gate, uintptr_t up, uintptr_t down, int gate_type, int down_type, int64_t n_ff,
                            int64_t n_embd, int n_expert, uintptr_t ids, uintptr_t weights, int n_used, int n_tok,
                            float clamp, bool accumulate, uintptr_t work, int tile) {
        check(ds4_cuda_moe_grouped(st(s), dev<float>(out), out_stride, dev<const float>(h), h_stride, dev<void>(gate),
                                   dev<void>(up), dev<void>(down), gate_type, down_type, n_ff, n_embd, n_expert,
                                   dev<const int32_t>(ids), dev<const float>(weights), n_used, n_tok, clamp,
                                   accumulate, dev<void>(work), tile), "moe_grouped");
    }, py::arg("stream"), py::arg("out"), py::arg("out_stride"), py::arg("h"), py::arg("h_stride"), py::arg("gate"),
       py::arg("up"), py::arg("down"), py::arg("gate_type"), py::arg("down_type"), py::arg("n_ff"), py::arg("n_embd"),
       py::arg("n_expert"), py::arg("ids"), py::arg("weights"), py::arg("n_used"), py::arg("n_tok"), py::arg("clamp"),
       py::arg("accumulate"), py::arg("work"), py::arg("tile") = 0);
    m.def("moe_work_bytes", &ds4_cuda_moe_work_bytes, py::arg("gate_type"), py::arg("down_type"), py::arg("n_tok"),
          py::arg("n_used"), py::arg("n_embd"), py::arg("n_ff"), py::arg("n_expert"));
    m.def("moe_gate_up", [](uintptr_t s, uintptr_t mid, uintptr_t h, int64_t h_stride, uintptr_t gate, uintptr_t up,
                            int type, int64_t n_ff, int64_t n_embd, int n_expert, uintptr_t ids, uintptr_t weights,
                            int n_used, int n_tok, float clamp) {
        check(ds4_cuda_moe_gate_up(st(s), dev<float>(mid), dev<const float>(h), h_stride, dev<void>(gate),
                                   dev<void>(up), type, n_ff, n_embd, n_expert, dev<const int32_t>(ids),
                                   dev<const float>(weights), n_used, n_tok, clamp), "moe_gate_up");
    }, py::arg("stream"), py::arg("mid"), py::arg("h"), py::arg("h_stride"), py::arg("gate"), py::arg("up"),
       py::arg("type"), py::arg("n_ff"), py::arg("n_embd"), py::arg("n_expert"), py::arg("ids"), py::arg("weights"),
       py::arg("n_used"), py::arg("n_tok"), py::arg("clamp"));
    m.def("moe_route_gate_up", [](uintptr_t s, uintptr_t mid, uintptr_t ids, uintptr_t weights, uintptr_t logits,
                                  uintptr_t bias, uintptr_t tid2eid, uintptr_t tokens, float scale, bool normalize,
                                  uintptr_t h, int64_t h_stride, uintptr_t gate, uintptr_t up, int type, int64_t n_ff,
                                  int64_t n_embd, int n_expert, int n_used, int n_tok, float clamp, uintptr_t sh_gate,
                                  uintptr_t sh_up, int64_t sh_n_ff, float sh_clamp, uintptr_t sh_mid, uintptr_t hc,
                                  int hc_n_tok, int hc_n_iter, float hc_eps) {
        const ds4_cuda_shared_expert sh{dev<void>(sh_gate), dev<void>(sh_up), sh_n_ff, sh_clamp, dev<float>(sh_mid)};
        const ds4_cuda_sinkhorn sk{dev<float>(hc), hc_n_tok, hc_n_iter, hc_eps};
        check(ds4_cuda_moe_route_gate_up(st(s), dev<float>(mid), dev<int32_t>(ids), dev<float>(weights),
                                         dev<const float>(logits), dev<const float>(bias), dev<const int32_t>(tid2eid),
                                         dev<const int32_t>(tokens), scale, normalize, dev<const float>(h), h_stride,
                                         dev<void>(gate), dev<void>(up), type, n_ff, n_embd, n_expert, n_used, n_tok,
                                         clamp, sh_gate ? &sh : nullptr, hc ? &sk : nullptr),
              "moe_route_gate_up");
    }, py::arg("stream"), py::arg("mid"), py::arg("ids"), py::arg("weights"), py::arg("logits"), py::arg("bias"),
       py::arg("tid2eid"), py::arg("tokens"), py::arg("scale"), py::arg("normalize"), py::arg("h"),
       py::arg("h_stride"), py::arg("gate"), py::arg("up"), py::arg("type"), py::arg("n_ff"), py::arg("n_embd"),
       py::arg("n_expert"), py::arg("n_used"), py::arg("n_tok"), py::arg("clamp"), py::arg("sh_gate") = 0,
       py::arg("sh_up") = 0, py::arg("sh_n_ff") = 0, py::arg("sh_clamp") = 0.0f, py::arg("sh_mid") = 0,
       py::arg("hc") = 0, py::arg("hc_n_tok") = 0, py::arg("hc_n_iter") = 0, py::arg("hc_eps") = 0.0f);
    m.def("moe_shared_ok", &ds4_cuda_moe_shared_ok, py::arg("type"), py::arg("n_embd"), py::arg("n_tok"),
          "Whether moe_route_gate_up takes a shared expert (sh_*) for routed experts of `type`.");
    m.def("swiglu", [](uintptr_t s, uintptr_t mid, uintptr_t g, uintptr_t u, int64_t n, float clamp, uintptr_t xq) {
        check(ds4_cuda_swiglu(st(s), dev<float>(mid), dev<const float>(g), dev<const float>(u), n, clamp,
                              dev<void>(xq)), "swiglu");
    }, py::arg("stream"), py::arg("mid"), py::arg("g"), py::arg("u"), py::arg("n"), py::arg("clamp"),
       py::arg("xq") = 0);
    m.def("moe_down_quantize", [](uintptr_t s, uintptr_t work, uintptr_t mid, int type, int n_tok, int n_used,
                                  int64_t n_ff) {
        check(ds4_cuda_moe_down_quantize(st(s), dev<void>(work), dev<const float>(mid), type, n_tok, n_used, n_ff),
              "moe_down_quantize");
    }, py::arg("stream"), py::arg("work"), py::arg("mid"), py::arg("type"), py::arg("n_tok"), py::arg("n_used"),
       py::arg("n_ff"));
    m.def("moe_down", [](uintptr_t s, uintptr_t out, int64_t out_stride, uintptr_t mid, uintptr_t down, int type,
                         int64_t n_embd, int64_t n_ff, int n_expert, uintptr_t ids, int n_used, int n_tok,
                         bool accumulate, uintptr_t work, bool work_filled) {
        check(ds4_cuda_moe_down(st(s), dev<float>(out), out_stride, dev<const float>(mid), dev<void>(down), type,
                                n_embd, n_ff, n_expert, dev<const int32_t>(ids), n_used, n_tok, accumulate,
                                dev<void>(work), work_filled),
              "moe_down");
    }, py::arg("stream"), py::arg("out"), py::arg("out_stride"), py::arg("mid"), py::arg("down"), py::arg("type"),
       py::arg("n_embd"), py::arg("n_ff"), py::arg("n_expert"), py::arg("ids"), py::arg("n_used"), py::arg("n_tok"),
       py::arg("accumulate") = false, py::arg("work") = 0, py::arg("work_filled") = false);
    m.def("moe_down_work_bytes", &ds4_cuda_moe_down_work_bytes, py::arg("type"), py::arg("n_tok"), py::arg("n_used"),
          py::arg("n_ff"));
    m.def("attention_prefill_ok", &ds4_cuda_attention_prefill_ok, py::arg("dim"));
    m.def("attention_prefill", [](uintptr_t s, uintptr_t out, uintptr_t q, uintptr_t raw, int64_t raw_stride,
                                  uintptr_t raw_n, int raw_cap, uintptr_t comp, int64_t comp_stride, uintptr_t comp_n,
                                  int comp_cap, uintptr_t sel, int sel_cap, uintptr_t sinks, int n_tok, int n_head,
                                  int dim, float scale, uintptr_t raw_rows, uintptr_t comp_rows, uintptr_t rope_pos,
                                  uintptr_t rope_freq, int n_rot, float eps) {
        check(ds4_cuda_attention_prefill(st(s), dev<float>(out), dev<const float>(q), dev<const void>(raw), raw_stride,
                                         dev<const int32_t>(raw_n), raw_cap, dev<const void>(comp), comp_stride,
                                         dev<const int32_t>(comp_n), comp_cap, dev<const int32_t>(sel), sel_cap,
                                         dev<const float>(sinks), n_tok, n_head, dim, scale,
                                         dev<const void* const>(raw_rows), dev<const void* const>(comp_rows),
                                         dev<const int32_t>(rope_pos), dev<const double>(rope_freq), n_rot, eps),
              "attention_prefill");
    }, py::arg("stream"), py::arg("out"), py::arg("q"), py::arg("raw"), py::arg("raw_stride"), py::arg("raw_n"),
       py::arg("raw_cap"), py::arg("comp"), py::arg("comp_stride"), py::arg("comp_n"), py::arg("comp_cap"),
       py::arg("sel"), py::arg("sel_cap"), py::arg("sinks"), py::arg("n_tok"), py::arg("n_head"), py::arg("dim"),
       py::arg("scale"), py::arg("raw_rows") = 0, py::arg("comp_rows") = 0, py::arg("rope_pos") = 0,
       py::arg("rope_freq") = 0, py::arg("n_rot") = 0, py::arg("eps") = 0.0f);
    m.def("attention_decode", [](uintptr_t s, uintptr_t out, uintptr_t scratch, uintptr_t q, uintptr_t raw,
                                 int64_t raw_stride, uintptr_t raw_n, int raw_cap, uintptr_t comp, int64_t comp_stride,
                                 uintptr_t comp_n, int comp_cap, uintptr_t sel, int sel_cap, uintptr_t sinks, int n_tok,
                                 int n_head, int dim, float scale, uintptr_t raw_rows, uintptr_t comp_rows,
                                 bool f32_rows, uintptr_t rope_pos, uintptr_t rope_freq, int n_rot, uintptr_t kv_x,
                                 uintptr_t kv_w, float eps, int n_nope, uintptr_t xq, int xq_groups) {
        check(ds4_cuda_attention_decode(st(s), dev<float>(out), dev<void>(scratch), dev<const float>(q),
                                        dev<const void>(raw), raw_stride, dev<const int32_t>(raw_n), raw_cap,
                                        dev<const void>(comp), comp_stride, dev<const int32_t>(comp_n), comp_cap,
                                        dev<const int32_t>(sel), sel_cap, dev<const float>(sinks), n_tok, n_head, dim,
                                        scale, dev<const void* const>(raw_rows), dev<const void* const>(comp_rows),
                                        f32_rows, dev<const int32_t>(rope_pos), dev<const double>(rope_freq), n_rot,
                                        dev<const float>(kv_x), dev<const float>(kv_w), eps, n_nope, dev<void>(xq),
                                        xq_groups),
              "attention_decode");
    }, py::arg("stream"), py::arg("out"), py::arg("scratch"), py::arg("q"), py::arg("raw"), py::arg("raw_stride"),
       py::arg("raw_n"), py::arg("raw_cap"), py::arg("comp"), py::arg("comp_stride"), py::arg("comp_n"),
       py::arg("comp_cap"), py::arg("sel"), py::arg("sel_cap"), py::arg("sinks"), py::arg("n_tok"), py::arg("n_head"),
       py::arg("dim"), py::arg("scale"), py::arg("raw_rows") = 0, py::arg("comp_rows") = 0,
       py::arg("f32_rows") = false, py::arg("rope_pos") = 0, py::arg("rope_freq") = 0, py::arg("n_rot") = 0,
       py::arg("kv_x") = 0, py::arg("kv_w") = 0, py::arg("eps") = 0.0f, py::arg("n_nope") = 0, py::arg("xq") = 0,
       py::arg("xq_groups") = 0);
    m.def("attention_scratch_bytes", &ds4_cuda_attention_scratch_bytes, py::arg("n_tok"), py::arg("n_head"),
          py::arg("dim"), py::arg("raw_cap"), py::arg("comp_cap"), py::arg("sel_cap"), py::arg("has_sel"));
    m.def("rms_norm", [](uintptr_t s, uintptr_t y, int64_t y_stride, uintptr_t x, int64_t x_stride, uintptr_t w,
                         int64_t n_rows, int64_t n, float eps) {
        check(ds4_cuda_rms_norm(st(s), dev<float>(y), y_stride, dev<const float>(x), x_stride, dev<const float>(w),
                                n_rows, n, eps), "rms_norm");
    }, py::arg("stream"), py::arg("y"), py::arg("y_stride"), py::arg("x"), py::arg("x_stride"), py::arg("w"),
       py::arg("n_rows"), py::arg("n"), py::arg("eps"));
    m.def("rms_norm_rope", [](uintptr_t s, uintptr_t y, int64_t y_stride, uintptr_t x, int64_t x_stride,
                              uintptr_t w, int64_t n_rows, int64_t n, float eps, uintptr_t pos, int rows_per_tok,
                              uintptr_t inv_freq, int n_rot, py::object also) {
        ds4_cuda_rows b{};
        if (!also.is_none()) {
            auto t = also.cast<std::tuple<uintptr_t, int64_t, uintptr_t, int64_t, uintptr_t, int64_t, int>>();
            b = {dev<float>(std::get<0>(t)), std::get<1>(t), dev<const float>(std::get<2>(t)), std::get<3>(t),
                 dev<const float>(std::get<4>(t)), std::get<5>(t), std::get<6>(t)};
        }
        check(ds4_cuda_rms_norm_rope(st(s), dev<float>(y), y_stride, dev<const float>(x), x_stride,
                                     dev<const float>(w), n_rows, n, eps, dev<const int32_t>(pos), rows_per_tok,
                                     dev<const double>(inv_freq), n_rot, also.is_none() ? nullptr : &b),
              "rms_norm_rope");
    }, py::arg("stream"), py::arg("y"), py::arg("y_stride"), py::arg("x"), py::arg("x_stride"), py::arg("w"),
       py::arg("n_rows"), py::arg("n"), py::arg("eps"), py::arg("pos"), py::arg("rows_per_tok"), py::arg("inv_freq"),
       py::arg("n_rot"), py::arg("also") = py::none(),
       "rms_norm then RoPE; also = (y, y_stride, x, x_stride, w, n_rows, rows_per_tok): a second set of rows in the "
       "same launch.");
    // post_f, post_X, post_hc: the previous sublayer's hc_post, done inside (all three, or none).
    m.def("hc_pre", [](uintptr_t s, uintptr_t x, uintptr_t hc, uintptr_t scratch, uintptr_t X, int64_t x_stride,
                       uintptr_t fn, int fn_type, uintptr_t scale, uintptr_t base, int n_tok, int64_t n_embd, int n_mix,
                       int n_iter, float hc_eps, float rms_eps, uintptr_t norm_w, uintptr_t post_f, uintptr_t post_X,
                       uintptr_t post_hc, bool defer, uintptr_t xq_qs, uintptr_t xq_d) {
        const ds4_cuda_hc_post_in post{dev<const float>(post_f), dev<const float>(post_X), dev<const float>(post_hc)};
        const ds4_cuda_q8_out xq{dev<int8_t>(xq_qs), dev<float>(xq_d)};
        check(ds4_cuda_hc_pre(st(s), dev<float>(x), dev<float>(hc), dev<float>(scratch), dev<float>(X), x_stride,
                              dev<void>(fn), fn_type, dev<const float>(scale), dev<const float>(base), n_tok, n_embd,
                              n_mix, n_iter, hc_eps, rms_eps, dev<const float>(norm_w),
                              post_f || post_X || post_hc ? &post : nullptr, defer, xq_qs || xq_d ? &xq : nullptr),
              "hc_pre");
    }, py::arg("stream"), py::arg("x"), py::arg("hc"), py::arg("scratch"), py::arg("X"), py::arg("x_stride"),
       py::arg("fn"), py::arg("fn_type"), py::arg("scale"), py::arg("base"), py::arg("n_tok"), py::arg("n_embd"),
       py::arg("n_mix"), py::arg("n_iter"), py::arg("hc_eps"), py::arg("rms_eps"), py::arg("norm_w") = 0,
       py::arg("post_f") = 0, py::arg("post_X") = 0, py::arg("post_hc") = 0, py::arg("defer") = false,
       py::arg("xq_qs") = 0, py::arg("xq_d") = 0);
    m.def("hc_sinkhorn", [](uintptr_t s, uintptr_t hc, int n_tok, int n_iter, float hc_eps) {
        check(ds4_cuda_hc_sinkhorn(st(s), dev<float>(hc), n_tok, n_iter, hc_eps), "hc_sinkhorn");
    }, py::arg("stream"), py::arg("hc"), py::arg("n_tok"), py::arg("n_iter"), py::arg("hc_eps"));
    m.def("hc_pre_scratch_bytes", &ds4_cuda_hc_pre_scratch_bytes, py::arg("n_tok"), py::arg("n_embd"),
          py::arg("n_mix"));
    m.def("hc_post", [](uintptr_t s, uintptr_t X_out, uintptr_t f, uintptr_t X, uintptr_t hc, int n_tok,
                        int64_t n_embd) {
        check(ds4_cuda_hc_post(st(s), dev<float>(X_out), dev<const float>(f), dev<const float>(X),
                               dev<const float>(hc), n_tok, n_embd), "hc_post");
    }, py::arg("stream"), py::arg("X_out"), py::arg("f"), py::arg("X"), py::arg("hc"), py::arg("n_tok"),
       py::arg("n_embd"));
    m.def("rope", [](uintptr_t s, uintptr_t x, int64_t tok_stride, uintptr_t pos, int pos_delta, uintptr_t inv_freq,
                     int n_tok, int n_head, int head_dim, int n_rot, bool inverse) {
        check(ds4_cuda_rope(st(s), dev<float>(x), tok_stride, dev<const int32_t>(pos), pos_delta,
                            dev<const double>(inv_freq), n_tok, n_head, head_dim, n_rot, inverse), "rope");
    }, py::arg("stream"), py::arg("x"), py::arg("tok_stride"), py::arg("pos"), py::arg("pos_delta"),
       py::arg("inv_freq"), py::arg("n_tok"), py::arg("n_head"), py::arg("head_dim"), py::arg("n_rot"),
       py::arg("inverse") = false);
    m.def("kv_store", [](uintptr_t s, uintptr_t dst, int64_t dst_stride, uintptr_t x, int64_t x_stride, uintptr_t pos,
                         int pos_add, int pos_div, int ring, int n_tok, int dim, int n_nope, bool fp8,
                         uintptr_t dst_rows, bool f32_rows) {
        check(ds4_cuda_kv_store(st(s), dev<void>(dst), dst_stride, dev<const float>(x), x_stride,
                                dev<const int32_t>(pos), pos_add, pos_div, ring, n_tok, dim, n_nope, fp8,
                                dev<void* const>(dst_rows), f32_rows), "kv_store");
    }, py::arg("stream"), py::arg("dst"), py::arg("dst_stride"), py::arg("x"), py::arg("x_stride"), py::arg("pos"),
       py::arg("pos_add"), py::arg("pos_div"), py::arg("ring"), py::arg("n_tok"), py::arg("dim"), py::arg("n_nope"),
       py::arg("fp8") = true, py::arg("dst_rows") = 0, py::arg("f32_rows") = false);
    m.def("compress", [](uintptr_t s, uintptr_t pooled, uintptr_t kv, int64_t kv_stride, uintptr_t gate,
                         int64_t gate_stride, uintptr_t ape, uintptr_t pos, uintptr_t seg_first, uintptr_t seg_len,
                         uintptr_t state_kv, uintptr_t state_score, int n_seg, int d, int ratio, int n_tok,
                         int path) {
        check(ds4_cuda_compress(st(s), dev<float>(pooled), dev<const float>(kv), kv_stride, dev<const float>(gate),
                                gate_stride, dev<const float>(ape), dev<const int32_t>(pos),
                                dev<const int32_t>(seg_first), dev<const int32_t>(seg_len), dev<float* const>(state_kv),
                                dev<float* const>(state_score), n_seg, d, ratio, n_tok, path), "compress");
    }, py::arg("stream"), py::arg("pooled"), py::arg("kv"), py::arg("kv_stride"), py::arg("gate"),
       py::arg("gate_stride"), py::arg("ape"), py::arg("pos"), py::arg("seg_first"), py::arg("seg_len"),
       py::arg("state_kv"), py::arg("state_score"), py::arg("n_seg"), py::arg("d"), py::arg("ratio"),
       py::arg("n_tok"), py::arg("path") = 0);
    m.def("comp_finish", [](uintptr_t s, uintptr_t dst, uintptr_t pooled, uintptr_t norm, uintptr_t pos,
                            uintptr_t inv_freq, int n_tok, int d, int ratio, int n_rot, int mode, int n_nope, float eps,
                            bool f32_rows) {
        check(ds4_cuda_comp_finish(st(s), dev<void* const>(dst), dev<const float>(pooled), dev<const float>(norm),
                                   dev<const int32_t>(pos), dev<const double>(inv_freq), n_tok, d, ratio, n_rot, mode,
                                   n_nope, eps, f32_rows), "comp_finish");
    }, py::arg("stream"), py::arg("dst"), py::arg("pooled"), py::arg("norm"), py::arg("pos"), py::arg("inv_freq"),
       py::arg("n_tok"), py::arg("d"), py::arg("ratio"), py::arg("n_rot"), py::arg("mode"), py::arg("n_nope"),
       py::arg("eps"), py::arg("f32_rows") = false);
    m.def("hadamard_fp4", [](uintptr_t s, uintptr_t x, int64_t n_vec, uintptr_t pos, uintptr_t inv_freq, int n_rot,
                             int vec_per_tok) {
        check(ds4_cuda_hadamard_fp4(st(s), dev<float>(x), n_vec, dev<const int32_t>(pos),
                                    dev<const double>(inv_freq), n_rot, vec_per_tok),
              "hadamard_fp4");
    }, py::arg("stream"), py::arg("x"), py::arg("n_vec"), py::arg("pos") = 0, py::arg("inv_freq") = 0,
       py::arg("n_rot") = 0, py::arg("vec_per_tok") = 1);
    m.def("indexer_scores", [](uintptr_t s, uintptr_t scores, int64_t score_stride, uintptr_t q, uintptr_t w,
                               float w_scale, uintptr_t keys, uintptr_t n_vis, int n_tok, int n_head, int dim, int cap,
                               int top_k, bool f32_rows, uintptr_t work) {
        check(ds4_cuda_indexer_scores(st(s), dev<float>(scores), score_stride, dev<const float>(q),
                                      dev<const float>(w), w_scale, dev<const void* const>(keys),
                                      dev<const int32_t>(n_vis), n_tok, n_head, dim, cap, top_k, f32_rows,
                                      dev<void>(work)),
              "indexer_scores");
    }, py::arg("stream"), py::arg("scores"), py::arg("score_stride"), py::arg("q"), py::arg("w"), py::arg("w_scale"),
       py::arg("keys"), py::arg("n_vis"), py::arg("n_tok"), py::arg("n_head"), py::arg("dim"), py::arg("cap"),
       py::arg("top_k"), py::arg("f32_rows") = false, py::arg("work") = 0);
    m.def("indexer_scores_work_bytes", &ds4_cuda_indexer_scores_work_bytes, py::arg("n_tok"), py::arg("n_head"),
          py::arg("f32_rows") = false);
    m.def("topk", [](uintptr_t s, uintptr_t sel, uintptr_t scores, int64_t score_stride, uintptr_t n_vis, int n_tok,
                     int k, int cluster) {
        check(ds4_cuda_topk(st(s), dev<int32_t>(sel), dev<const float>(scores), score_stride,
                            dev<const int32_t>(n_vis), n_tok, k, cluster), "topk");
    }, py::arg("stream"), py::arg("sel"), py::arg("scores"), py::arg("score_stride"), py::arg("n_vis"),
       py::arg("n_tok"), py::arg("k"), py::arg("cluster") = 0);
    m.def("fp8_kv", [](uintptr_t s, uintptr_t y, uintptr_t x, int64_t n_rows, int dim, int n_nope) {
        check(ds4_cuda_fp8_kv(st(s), dev<float>(y), dev<const float>(x), n_rows, dim, n_nope), "fp8_kv");
    }, py::arg("stream"), py::arg("y"), py::arg("x"), py::arg("n_rows"), py::arg("dim"), py::arg("n_nope"));
    m.def("route", [](uintptr_t s, uintptr_t ids, uintptr_t weights, uintptr_t logits, uintptr_t bias,
                      uintptr_t tid2eid, uintptr_t tokens, int n_tok, int n_expert, int n_used, float scale,
                      bool normalize) {
        check(ds4_cuda_route(st(s), dev<int32_t>(ids), dev<float>(weights), dev<const float>(logits),
                             dev<const float>(bias), dev<const int32_t>(tid2eid), dev<const int32_t>(tokens), n_tok,
                             n_expert, n_used, scale, normalize), "route");
    }, py::arg("stream"), py::arg("ids"), py::arg("weights"), py::arg("logits"), py::arg("bias"), py::arg("tid2eid"),
       py::arg("tokens"), py::arg("n_tok"), py::arg("n_expert"), py::arg("n_used"), py::arg("scale"),
       py::arg("normalize") = true);
    m.def("embed", [](uintptr_t s, uintptr_t X, uintptr_t table, int type, uintptr_t tokens, int n_tok,
                      int64_t n_embd, int n_hc, uintptr_t follow, uintptr_t prev) {
        check(ds4_cuda_embed(st(s), dev<float>(X), dev<void>(table), type, dev<int32_t>(tokens), n_tok, n_embd,
                             n_hc, dev<const int32_t>(follow), dev<const int64_t>(prev)), "embed");
    }, py::arg("stream"), py::arg("X"), py::arg("table"), py::arg("type"), py::arg("tokens"), py::arg("n_tok"),
       py::arg("n_embd"), py::arg("n_hc"), py::arg("follow") = 0, py::arg("prev") = 0);
    m.def("sample", [](uintptr_t s, uintptr_t ids, uintptr_t draws, uintptr_t x, int64_t x_stride, int n_rows,
                       int n, uintptr_t ids_host) {
        check(ds4_cuda_sample(st(s), dev<int32_t>(ids), dev<const ds4_cuda_draw>(draws), dev<const float>(x),
                              x_stride, n_rows, n, dev<int32_t>(ids_host)),
              "sample");
    }, py::arg("stream"), py::arg("ids"), py::arg("draws"), py::arg("x"), py::arg("x_stride"), py::arg("n_rows"),
       py::arg("n"), py::arg("ids_host") = 0);
    m.def("draw_bytes", []() { return sizeof(ds4_cuda_draw); });
}
