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
#include <climits>
#include <cstdint>
#include <string>
#include <utility>
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

Weights weights_arg(const py::array& w, int type, int64_t cols, const std::string& name = "w") {
    check_type_cols(type, cols);
    if (!weight_dtype_ok(w.dtype(), type))
        throw py::type_error(name + ": dtype " + str(w.dtype()) + " cannot hold " + type_name(type) +
                             " weights (pass uint8 bytes" +
                             (type == TYPE_F32   ? ", or float32"
                              : type == TYPE_F16 ? ", or float16"
                              : type == TYPE_BF16 ? ", or uint16"
                                                  : "") +
                             ")");
    if (!(w.flags() & py::array::c_style)) throw py::value_error(name + " must be C-contiguous");
    if (w.ndim() == 0) throw py::value_error(name + " must have at least one dimension");
    const int64_t rb = (int64_t)row_bytes(type, cols);
    if (w.ndim() >= 2 && w.shape(w.ndim() - 1) * w.itemsize() != rb)
        throw py::value_error(name + ": its last dimension holds " +
                              std::to_string(w.shape(w.ndim() - 1) * w.itemsize()) + " bytes, but a row of " +
                              std::to_string(cols) + " " + type_name(type) + " weights is " + std::to_string(rb) +
                              " bytes");
    const int64_t nbytes = w.nbytes();
    if (nbytes % rb != 0)
        throw py::value_error(name + " holds " + std::to_string(nbytes) + " bytes, not a whole number of " +
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

// ---- arguments of the fused ops ----------------------------------------------------------------------------------

// A float32 array of the given number of dimensions, C-contiguous (the fused ops index it directly).
py::array f32_array_arg(const py::handle& obj, const char* name, int ndim) {
    if (!py::isinstance<py::array>(obj)) throw py::type_error(std::string(name) + ": expected a numpy array");
    py::array a = py::reinterpret_borrow<py::array>(obj);
    const py::dtype dt = a.dtype();
    if (!(dt.kind() == 'f' && dt.itemsize() == 4 && native_order(dt)))
        throw py::type_error(std::string(name) + ": expected float32, got " + str(dt));
    if (a.ndim() != ndim)
        throw py::value_error(std::string(name) + ": expected a " + std::to_string(ndim) + "-D array, got " +
                              std::to_string(a.ndim()) + "-D");
    if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + " must be C-contiguous");
    return a;
}

// An integer array of the given shape (-1: any length), as contiguous int64 (converted if it is another integer
// type). Floats and booleans are refused: an index must be an integer.
py::array_t<int64_t> int_array_arg(const py::handle& obj, const char* name, std::vector<int64_t> shape) {
    if (!py::isinstance<py::array>(obj)) throw py::type_error(std::string(name) + ": expected a numpy array");
    py::array a = py::reinterpret_borrow<py::array>(obj);
    const char kind = a.dtype().kind();
    if (kind != 'i' && kind != 'u')
        throw py::type_error(std::string(name) + ": expected an integer array, got " + str(a.dtype()));
    if (a.ndim() != (py::ssize_t)shape.size())
        throw py::value_error(std::string(name) + ": expected a " + std::to_string(shape.size()) + "-D array, got " +
                              std::to_string(a.ndim()) + "-D");
    for (size_t i = 0; i < shape.size(); ++i)
        if (shape[i] >= 0 && a.shape(i) != shape[i])
            throw py::value_error(std::string(name) + ": dimension " + std::to_string(i) + " is " +
                                  std::to_string(a.shape(i)) + ", expected " + std::to_string(shape[i]));
    if (kind == 'u' && a.itemsize() == 8) {  // values above 2^63 must not wrap into valid-looking negatives
        py::array_t<uint64_t, py::array::c_style | py::array::forcecast> u(a);
        for (py::ssize_t i = 0; i < u.size(); ++i)
            if (u.data()[i] > (uint64_t)INT64_MAX) throw py::value_error(std::string(name) + ": value out of range");
    }
    return py::array_t<int64_t, py::array::c_style | py::array::forcecast>(a);
}

// Rows kept in pages (RowStore): each page a C-contiguous (page_rows, width) array of float16 or float32, all
// alike, holding `count` rows in order. The arrays are kept referenced while the GIL is released.
struct Pages {
    std::vector<py::array> keep;
    std::vector<const void*> ptrs;
    int64_t page_rows = 1;
    int kind = 0;  // 0: no pages, 2: float16, 4: float32
};

int row_dtype_kind(const py::dtype& dt) {
    if (dt.kind() == 'f' && native_order(dt) && (dt.itemsize() == 2 || dt.itemsize() == 4)) return (int)dt.itemsize();
    return -1;
}

Pages pages_arg(const py::handle& obj, const char* name, int64_t width, int64_t count) {
    if (py::isinstance<py::array>(obj) || !py::isinstance<py::sequence>(obj) || py::isinstance<py::str>(obj))
        throw py::type_error(std::string(name) + ": expected a list of page arrays");
    if (count < 0) throw py::value_error(std::string(name) + ": the row count must not be negative");
    Pages p;
    for (const py::handle item : py::reinterpret_borrow<py::sequence>(obj)) {
        if (!py::isinstance<py::array>(item))
            throw py::type_error(std::string(name) + ": every page must be a numpy array");
        py::array a = py::reinterpret_borrow<py::array>(item);
        const int kind = row_dtype_kind(a.dtype());
        if (kind < 0)
            throw py::type_error(std::string(name) + ": pages must hold float16 or float32, got " + str(a.dtype()));
        if (a.ndim() != 2 || a.shape(1) != width || a.shape(0) < 1)
            throw py::value_error(std::string(name) + ": pages must be (rows, " + std::to_string(width) + ") arrays");
        if (!(a.flags() & py::array::c_style))
            throw py::value_error(std::string(name) + ": pages must be C-contiguous");
        if (p.keep.empty()) {
            p.page_rows = a.shape(0);
            p.kind = kind;
        } else if (a.shape(0) != p.page_rows || kind != p.kind) {
            throw py::value_error(std::string(name) + ": all pages must have the same rows and dtype");
        }
        p.ptrs.push_back(a.data());
        p.keep.push_back(a);
    }
    if (count > (int64_t)p.keep.size() * p.page_rows)
        throw py::value_error(std::string(name) + ": " + std::to_string(count) + " rows do not fit in " +
                              std::to_string(p.keep.size()) + " pages of " + std::to_string(p.page_rows));
    return p;
}

// ---- the fused ops -----------------------------------------------------------------------------------------------

py::array py_moe(const py::handle& h_arg, const py::handle& ids_arg, const py::handle& weights_arg_,
                 const py::array& gate, int gate_type, const py::array& up, int up_type, const py::array& down,
                 int down_type, int64_t n_ff, double clamp, bool act8) {
    const py::array h = f32_array_arg(h_arg, "h", 2);
    const int64_t N = h.shape(0), E = h.shape(1);
    if (E <= 0) throw py::value_error("h: rows must not be empty");
    if (n_ff <= 0) throw py::value_error("n_ff must be positive, got " + std::to_string(n_ff));
    if (!(clamp > 0)) throw py::value_error("clamp must be positive");
    auto experts = [](const py::array& w, const char* name, int type, int64_t rows, int64_t cols) {
        const Weights wt = weights_arg(w, type, cols, name);
        if (w.ndim() != 3)
            throw py::value_error(std::string(name) + ": expected (n_expert, " + std::to_string(rows) +
                                  ", row) experts, got a " + std::to_string(w.ndim()) + "-D array");
        if (w.shape(1) != rows)
            throw py::value_error(std::string(name) + ": experts of " + std::to_string(w.shape(1)) +
                                  " rows, expected " + std::to_string(rows));
        if (w.shape(0) < 1) throw py::value_error(std::string(name) + ": no experts");
        return std::make_pair(wt.data, (int64_t)w.shape(0));
    };
    const auto g = experts(gate, "gate", gate_type, n_ff, E);
    const auto u = experts(up, "up", up_type, n_ff, E);
    const auto d = experts(down, "down", down_type, E, n_ff);
    if (g.second != u.second || g.second != d.second)
        throw py::value_error("gate, up and down must hold the same number of experts (" + std::to_string(g.second) +
                              ", " + std::to_string(u.second) + ", " + std::to_string(d.second) + ")");
    const int64_t n_expert = g.second;
    const py::array_t<int64_t> ids = int_array_arg(ids_arg, "ids", {N, -1});
    const int64_t K = ids.shape(1);
    const py::array wts = f32_array_arg(weights_arg_, "weights", 2);
    if (wts.shape(0) != N || wts.shape(1) != K)
        throw py::value_error("weights: shape must be (" + std::to_string(N) + ", " + std::to_string(K) + ") like ids");
    const int64_t* idp = ids.data();
    for (int64_t i = 0; i < N * K; ++i)
        if (idp[i] < 0 || idp[i] >= n_expert)
            throw py::value_error("ids: expert " + std::to_string(idp[i]) + " out of range [0, " +
                                  std::to_string(n_expert) + ")");
    py::array_t<float> out(std::vector<py::ssize_t>{N, E});
    float* o = out.mutable_data();
    const float* hp = (const float*)h.data();
    const float* wp = (const float*)wts.data();
    {
        py::gil_scoped_release nogil;
        ds4_cpu_moe(o, E, hp, E, N, E, idp, wp, K, g.first, gate_type, u.first, up_type, d.first, down_type, n_expert,
                    n_ff, (float)clamp, act8);
    }
    return out;
}

py::array py_attention(const py::handle& q_arg, const py::handle& raw_arg, const py::handle& lo_arg,
                       const py::handle& hi_arg, const py::handle& pages_obj, int64_t comp_count,
                       const py::handle& sel_arg, const py::handle& n_arg, const py::handle& sinks_arg, double scale) {
    const py::array q = f32_array_arg(q_arg, "q", 3);
    const int64_t T = q.shape(0), H = q.shape(1), D = q.shape(2);
    if (D <= 0) throw py::value_error("q: heads must not be empty");
    if (!py::isinstance<py::array>(raw_arg)) throw py::type_error("raw: expected a numpy array");
    const py::array raw = py::reinterpret_borrow<py::array>(raw_arg);
    const int raw_kind = row_dtype_kind(raw.dtype());
    if (raw_kind < 0) throw py::type_error("raw: expected float16 or float32 rows, got " + str(raw.dtype()));
    if (raw.ndim() != 2 || raw.shape(1) != D)
        throw py::value_error("raw: expected (rows, " + std::to_string(D) + ") rows");
    if (!(raw.flags() & py::array::c_style)) throw py::value_error("raw must be C-contiguous");
    const int64_t R = raw.shape(0);
    const py::array_t<int64_t> lo = int_array_arg(lo_arg, "raw_lo", {T}), hi = int_array_arg(hi_arg, "raw_hi", {T});
    for (int64_t t = 0; t < T; ++t)
        if (!(0 <= lo.data()[t] && lo.data()[t] <= hi.data()[t] && hi.data()[t] <= R))
            throw py::value_error("raw_lo/raw_hi: token " + std::to_string(t) + " asks rows [" +
                                  std::to_string(lo.data()[t]) + ", " + std::to_string(hi.data()[t]) + ") of " +
                                  std::to_string(R));
    const Pages pages = pages_arg(pages_obj, "comp_pages", D, comp_count);
    if (R > 0 && comp_count > 0 && pages.kind != raw_kind)
        throw py::type_error("raw and comp_pages must hold the same dtype");
    const bool f16 = (R > 0 ? raw_kind : pages.kind) == 2;
    const py::array_t<int64_t> n = int_array_arg(n_arg, "comp_n", {T});
    for (int64_t t = 0; t < T; ++t)
        if (n.data()[t] < 0 || n.data()[t] > comp_count)
            throw py::value_error("comp_n: token " + std::to_string(t) + " asks " + std::to_string(n.data()[t]) +
                                  " of " + std::to_string(comp_count) + " compressed rows");
    py::array_t<int64_t> sel;
    int64_t sel_width = 0;
    if (!sel_arg.is_none()) {
        sel = int_array_arg(sel_arg, "comp_sel", {T, -1});
        sel_width = sel.shape(1);
        for (int64_t i = 0; i < T * sel_width; ++i)
            if (sel.data()[i] >= comp_count)
                throw py::value_error("comp_sel: row " + std::to_string(sel.data()[i]) + " of " +
                                      std::to_string(comp_count) + " compressed rows");
    }
    const py::array sinks = f32_array_arg(sinks_arg, "sinks", 1);
    if (sinks.shape(0) != H) throw py::value_error("sinks: expected " + std::to_string(H) + " values, one per head");
    py::array_t<float> out(std::vector<py::ssize_t>{T, H, D});
    float* o = out.mutable_data();
    const float* qp = (const float*)q.data();
    const void* rp = raw.data();
    const int64_t* sp = sel_arg.is_none() ? nullptr : sel.data();
    {
        py::gil_scoped_release nogil;
        ds4_cpu_attention(o, qp, T, H, D, rp, lo.data(), hi.data(), pages.ptrs.data(), pages.page_rows, sp, sel_width,
                          n.data(), f16, (const float*)sinks.data(), (float)scale);
    }
    return out;
}

py::array py_indexer_topk(const py::handle& q_arg, const py::handle& w_arg, const py::handle& pages_obj,
                          int64_t key_count, const py::handle& n_arg, int64_t top_k, double w_scale) {
    const py::array q = f32_array_arg(q_arg, "q", 3);
    const int64_t T = q.shape(0), H = q.shape(1), D = q.shape(2);
    if (H <= 0 || D <= 0) throw py::value_error("q: expected (tokens, heads, dim) with heads and dim positive");
    const py::array w = f32_array_arg(w_arg, "w", 2);
    if (w.shape(0) != T || w.shape(1) != H)
        throw py::value_error("w: expected (" + std::to_string(T) + ", " + std::to_string(H) + "), one per head");
    if (top_k < 0) throw py::value_error("top_k must not be negative");
    const Pages pages = pages_arg(pages_obj, "key_pages", D, key_count);
    const py::array_t<int64_t> n = int_array_arg(n_arg, "n_visible", {T});
    for (int64_t t = 0; t < T; ++t)
        if (n.data()[t] < 0 || n.data()[t] > key_count)
            throw py::value_error("n_visible: token " + std::to_string(t) + " sees " + std::to_string(n.data()[t]) +
                                  " of " + std::to_string(key_count) + " key rows");
    py::array_t<int64_t> sel(std::vector<py::ssize_t>{T, top_k});
    int64_t* s = sel.mutable_data();
    const float* qp = (const float*)q.data();
    const float* wp = (const float*)w.data();
    {
        py::gil_scoped_release nogil;
        ds4_cpu_indexer_topk(s, qp, wp, T, H, D, pages.ptrs.data(), pages.page_rows, pages.kind == 2, n.data(), top_k,
                             (float)w_scale);
    }
    return sel;
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
        "Flash GGUF files (F32, F16, BF16, Q8_0, Q2_K, Q4_K, IQ2_XXS), and the fused ops of a layer (routed "
        "experts, attention with sinks, the indexer's top-k), at the best ISA level of this CPU, on a persistent "
        "thread pool.";
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
    m.def("moe", &py_moe, py::arg("h"), py::arg("ids"), py::arg("weights"), py::arg("gate"), py::arg("gate_type"),
          py::arg("up"), py::arg("up_type"), py::arg("down"), py::arg("down_type"), py::arg("n_ff"), py::arg("clamp"),
          py::arg("act8") = false,
          "The routed experts of one MoE layer: out[t] = sum over k (in order) of down_e . (silu(min(g, clamp)) * "
          "clip(u, -clamp, clamp) * weights[t, k]) with g = gate_e . h_t, u = up_e . h_t, e = ids[t, k]. h float32 "
          "(N, E); ids integer (N, K); weights float32 (N, K); gate/up (n_expert, n_ff, row) and down (n_expert, E, "
          "row) as the GGUF stores them. The products are those of matmul (act8 as there); -> float32 (N, E).");
    m.def("attention", &py_attention, py::arg("q"), py::arg("raw"), py::arg("raw_lo"), py::arg("raw_hi"),
          py::arg("comp_pages"), py::arg("comp_count"), py::arg("comp_sel"), py::arg("comp_n"), py::arg("sinks"),
          py::arg("scale"),
          "Attention with a per-head sink, K = V: q float32 (T, H, D); token t sees raw rows [raw_lo[t], raw_hi[t]) "
          "of raw (R, D) and the compressed rows comp_sel[t] (>= 0; -1 pads) or, when comp_sel is None, rows "
          "[0, comp_n[t]) of comp_count rows kept in comp_pages, a list of (rows, D) arrays; rows float16 or "
          "float32. -> float32 (T, H, D).");
    m.def("indexer_topk", &py_indexer_topk, py::arg("q"), py::arg("w"), py::arg("key_pages"), py::arg("key_count"),
          py::arg("n_visible"), py::arg("top_k"), py::arg("w_scale"),
          "The indexer's rows per token: 0..n-1 padded with -1 when n = n_visible[t] <= top_k, else the top_k rows "
          "c < n by sum_h (w[t, h] * w_scale) * max(0, q[t, h] . k_c), ties to the lower index, ascending. q "
          "float32 (T, H, D), w float32 (T, H), keys in pages as for attention. -> int64 (T, top_k).");
}
