// ds4d._cpu: the one pybind11 binding file of the CPU backend.
//
// Owns the Python face of the native CPU kernels: argument checking (every malformed input becomes a
// TypeError / ValueError with a message naming the argument, never a crash), zero-copy access to numpy buffers
// (read-only memory maps included), and releasing the GIL around the work. The computing lives in the ds4_cpu_*
// entry points (ds4_cpu.h). Called by ds4d.ops.cpu and the tests.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <string>
#include <vector>

#include "ds4_cpu.h"

namespace py = pybind11;
using namespace ds4;

namespace {

// A sanity bound on the size of one row (DS4's widest has 16384 values), so that a mistaken cols fails cleanly
// instead of overflowing a size computation.
constexpr int64_t kMaxRowBytes = int64_t(1) << 27;

const char* type_name(int type) {
    switch (type) {
        case TYPE_F32: return "F32";
        case TYPE_F16: return "F16";
        case TYPE_Q8_0: return "Q8_0";
        case TYPE_Q2_K: return "Q2_K";
        case TYPE_Q4_K: return "Q4_K";
        case TYPE_IQ2_XXS: return "IQ2_XXS";
        case TYPE_BF16: return "BF16";
        default: return nullptr;
    }
}

std::string str(const py::handle& h) { return py::str(h).cast<std::string>(); }

void check_type_cols(int type, int64_t cols) {
    if (!type_name(type))
        throw py::value_error("unsupported weight type code " + std::to_string(type) +
                              " (supported: F32=0, F16=1, Q8_0=8, Q2_K=10, Q4_K=12, IQ2_XXS=16, BF16=30)");
    const int bw = block_weights(type);
    if (cols <= 0 || cols % bw != 0)
        throw py::value_error("cols=" + std::to_string(cols) + " must be a positive multiple of " + std::to_string(bw) +
                              " for " + type_name(type));
    if ((int64_t)row_bytes(type, cols) > kMaxRowBytes)
        throw py::value_error("cols=" + std::to_string(cols) + " is too wide (rows are limited to 128 MiB)");
}

bool native_order(const py::dtype& dt) { return dt.byteorder() != '>'; }

// The dtypes that may carry weights of `type`: raw bytes always, or the natural element type.
bool weight_dtype_ok(const py::dtype& dt, int type) {
    if (!native_order(dt)) return false;
    const char kind = dt.kind();
    const auto size = dt.itemsize();
    if (kind == 'u' && size == 1) return true;
    switch (type) {
        case TYPE_F32: return kind == 'f' && size == 4;
        case TYPE_F16: return kind == 'f' && size == 2;
        case TYPE_BF16: return (kind == 'u' || kind == 'i') && size == 2;
        default: return false;
    }
}

struct Weights {
    const uint8_t* data;
    int64_t rows;
};

Weights weights_arg(const py::array& w, int type, int64_t cols) {
    check_type_cols(type, cols);
    if (!weight_dtype_ok(w.dtype(), type))
        throw py::type_error(std::string("w: dtype ") + str(w.dtype()) + " cannot hold " + type_name(type) +
                             " weights (pass uint8 bytes" +
                             (type == TYPE_F32   ? ", or float32"
                              : type == TYPE_F16 ? ", or float16"
                              : type == TYPE_BF16 ? ", or uint16"
                                                  : "") +
                             ")");
    if (!(w.flags() & py::array::c_style)) throw py::value_error("w must be C-contiguous");
    if (w.ndim() == 0) throw py::value_error("w must have at least one dimension");
    const int64_t rb = (int64_t)row_bytes(type, cols);
    if (w.ndim() >= 2 && w.shape(w.ndim() - 1) * w.itemsize() != rb)
        throw py::value_error("w: its last dimension holds " + std::to_string(w.shape(w.ndim() - 1) * w.itemsize()) +
                              " bytes, but a row of " + std::to_string(cols) + " " + type_name(type) + " weights is " +
                              std::to_string(rb) + " bytes");
    const int64_t nbytes = w.nbytes();
    if (nbytes % rb != 0)
        throw py::value_error("w holds " + std::to_string(nbytes) + " bytes, not a whole number of " +
                              std::to_string(rb) + "-byte rows of " + std::to_string(cols) + " " + type_name(type) +
                              " weights");
    return {(const uint8_t*)w.data(), nbytes / rb};
}

// A float32 matrix argument (n, width) whose rows may be strided but are contiguous inside; a 1-D array is one
// row. Returns the row stride in floats.
struct Rows {
    int64_t n, stride;
    bool one_d;
};

Rows f32_rows_arg(const py::array& a, const char* name, int64_t width) {
    const py::dtype dt = a.dtype();
    if (!(dt.kind() == 'f' && dt.itemsize() == 4 && native_order(dt)))
        throw py::type_error(std::string(name) + ": expected float32, got " + str(dt));
    if (a.ndim() != 1 && a.ndim() != 2)
        throw py::value_error(std::string(name) + ": expected a 1-D or 2-D array, got " + std::to_string(a.ndim()) +
                              "-D");
    const bool one_d = a.ndim() == 1;
    const int64_t n = one_d ? 1 : a.shape(0), w = a.shape(a.ndim() - 1);
    if (w != width)
        throw py::value_error(std::string(name) + ": rows of " + std::to_string(w) + " values, expected " +
                              std::to_string(width));
    if (n == 0 || width == 0) return {n, width, one_d};  // empty: nothing is read or written
    if ((uintptr_t)a.data() % 4 != 0) throw py::value_error(std::string(name) + " is not 4-byte aligned");
    if (width > 1 && a.strides(a.ndim() - 1) != 4)
        throw py::value_error(std::string(name) + ": each row must be contiguous (inner stride 4 bytes)");
    int64_t stride = width;
    if (!one_d && n > 1) {
        const int64_t s = a.strides(0);
        if (s % 4 != 0 || s < 4 * width)
            throw py::value_error(std::string(name) + ": row stride " + std::to_string(s) +
                                  " bytes must be a multiple of 4 and at least a row (" + std::to_string(4 * width) +
                                  ")");
        stride = s / 4;
    }
    return {n, stride, one_d};
}

// Whether out shares memory with x: numpy's exact test, asked only when the address ranges intersect (x and
// out may well be interleaved column ranges of one buffer).
bool overlaps(const py::array& x, const Rows& rx, const py::array& y, const Rows& ry) {
    const float* a = (const float*)x.data();
    const float* b = (const float*)y.data();
    const float* a_end = a + (rx.n - 1) * rx.stride + x.shape(x.ndim() - 1);
    const float* b_end = b + (ry.n - 1) * ry.stride + y.shape(y.ndim() - 1);
    if (!(a < b_end && b < a_end)) return false;
    return py::module_::import("numpy").attr("shares_memory")(x, y).cast<bool>();
}

// ---- the functions -----------------------------------------------------------------------------------------------

int64_t py_row_bytes(int type, int64_t cols) {
    check_type_cols(type, cols);
    return (int64_t)row_bytes(type, cols);
}

py::array_t<float> py_dequantize(const py::array& w, int type, int64_t cols) {
    const Weights wt = weights_arg(w, type, cols);
    py::array_t<float> out({wt.rows, cols});
    float* o = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        ds4_cpu_dequantize(o, wt.data, type, wt.rows, cols);
    }
    return out;
}

py::array py_matmul(const py::array& w, int type, int64_t cols, const py::array& x, const py::object& out_arg,
                    bool act8) {
    const Weights wt = weights_arg(w, type, cols);
    const Rows xr = f32_rows_arg(x, "x", cols);
    py::array out;
    if (out_arg.is_none()) {
        out = xr.one_d ? py::array_t<float>(std::vector<py::ssize_t>{wt.rows})
                       : py::array_t<float>(std::vector<py::ssize_t>{xr.n, wt.rows});
    } else {
        if (!py::isinstance<py::array>(out_arg)) throw py::type_error("out: expected a numpy array or None");
        out = py::reinterpret_borrow<py::array>(out_arg);
        if (out.ndim() != x.ndim())
            throw py::value_error("out: expected " + std::to_string(x.ndim()) + "-D like x, got " +
                                  std::to_string(out.ndim()) + "-D");
    }
    const Rows yr = f32_rows_arg(out, "out", wt.rows);
    if (!xr.one_d && out.shape(0) != xr.n)
        throw py::value_error("out: " + std::to_string(out.shape(0)) + " rows for " + std::to_string(xr.n) + " tokens");
    if (!out.writeable()) throw py::value_error("out is read-only");
    if (xr.n > 0 && wt.rows > 0 && overlaps(x, xr, out, yr)) throw py::value_error("out overlaps x");
    const float* xp = (const float*)x.data();
    float* yp = (float*)out.mutable_data();
    {
        py::gil_scoped_release nogil;
        ds4_cpu_matmul(yp, yr.stride, wt.data, type, wt.rows, cols, xp, xr.stride, xr.n, act8);
    }
    return out;
}

py::tuple py_quantize_act(const py::array& x, const std::string& kind) {
    const bool k_blocks = kind == "q8_k";
    if (!k_blocks && kind != "q8_0") throw py::value_error("kind must be 'q8_0' or 'q8_k', got '" + kind + "'");
    const int64_t block = k_blocks ? QK_K : QK8_0;
    if (x.ndim() != 1 && x.ndim() != 2) throw py::value_error("x: expected a 1-D or 2-D array");
    const int64_t cols = x.shape(x.ndim() - 1);
    if (cols <= 0 || cols % block != 0)
        throw py::value_error("x: rows of " + std::to_string(cols) + " values, not a positive multiple of " +
                              std::to_string(block));
    const Rows xr = f32_rows_arg(x, "x", cols);
    const int64_t nb = cols / block;
    auto shape = [&](int64_t last) {
        return xr.one_d ? std::vector<py::ssize_t>{last} : std::vector<py::ssize_t>{xr.n, last};
    };
    const ActRowLayout l = act_row_layout(cols, (int)block);
    std::vector<uint8_t> rows(l.bytes * xr.n);
    {
        py::gil_scoped_release nogil;
        ds4_cpu_quantize_act(rows.data(), (const float*)x.data(), xr.stride, xr.n, cols, (int)block);
    }
    py::array_t<float> d(shape(nb));
    py::array_t<int8_t> qs(shape(cols));
    py::array_t<int16_t> bsums(shape(k_blocks ? cols / 16 : 0));
    for (int64_t t = 0; t < xr.n; ++t) {
        const uint8_t* row = rows.data() + t * l.bytes;
        std::copy_n((const float*)row, nb, d.mutable_data() + t * nb);
        std::copy_n((const int8_t*)(row + l.qs_offset), cols, qs.mutable_data() + t * cols);
        if (k_blocks)
            std::copy_n((const int16_t*)(row + l.sums_offset), cols / 16, bsums.mutable_data() + t * (cols / 16));
    }
    if (k_blocks) return py::make_tuple(d, qs, bsums);
    return py::make_tuple(d, qs);
}

void py_set_isa(const std::string& name) {
    if (ds4_cpu_set_isa(name)) return;
    std::string list;
    for (const auto& a : ds4_cpu_available_isas()) list += (list.empty() ? "" : ", ") + a;
    throw py::value_error("ISA level '" + name + "' is not available (available: " + list + ")");
}

void py_set_threads(int n) {
    if (n < 1 || n > 4096) throw py::value_error("threads must be in 1..4096, got " + std::to_string(n));
    py::gil_scoped_release nogil;  // waits for a running product
    ds4_cpu_set_threads(n);
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
    m.doc() =
        "Native CPU kernels of ds4d: dequantization and matrix products for the GGML weight types of DeepSeek V4 "
        "Flash GGUF files (F32, F16, BF16, Q8_0, Q2_K, Q4_K, IQ2_XXS), at the best ISA level of this CPU, on a "
        "persistent thread pool.";
    ds4_cpu_init();

    m.def("available_isas", &ds4_cpu_available_isas,
          "ISA levels built into this module and supported by this CPU, from 'portable' up to 'avx512'.");
    m.def("isa", [] { return std::string(ds4_cpu_isa()); }, "The ISA level the kernels use now.");
    m.def("set_isa", &py_set_isa, py::arg("name"), "Switch the kernels to an available ISA level (ValueError if not).");
    m.def("set_threads", &py_set_threads, py::arg("n"), "Size of the worker pool, the calling thread included.");
    m.def("threads", &ds4_cpu_threads, "Size of the worker pool.");
    m.def("row_bytes", &py_row_bytes, py::arg("type"), py::arg("cols"),
          "Bytes of one row of `cols` weights of `type`.");
    m.def("dequantize", &py_dequantize, py::arg("w"), py::arg("type"), py::arg("cols"),
          "Rows of `type` weights (any C-contiguous array holding whole rows, e.g. an expert slice of a memory-mapped "
          "tensor) -> float32 (rows, cols), bit for bit as gguf.quants.dequantize.");
    m.def("matmul", &py_matmul, py::arg("w"), py::arg("type"), py::arg("cols"), py::arg("x"),
          py::arg("out") = py::none(), py::arg("act8") = false,
          "y[t, o] = sum_i W[o, i] x[t, i] for x float32 (T, cols) (rows may be strided) into out (T, rows) (a new "
          "array, or a given one, rows possibly strided). act8=True quantizes x (Q8_0 / Q8_K activation blocks) and "
          "takes exact integer dot products (quantized weight types only; ignored for F32/F16/BF16).");
    m.def("quantize_act", &py_quantize_act, py::arg("x"), py::arg("kind"),
          "The act8 activation quantizers: kind 'q8_0' -> (d (T, cols/32) float32, qs (T, cols) int8); kind 'q8_k' -> "
          "(d (T, cols/256), qs (T, cols), bsums (T, cols/16) int16).");
}
