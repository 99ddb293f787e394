"""abot/platform/kernels.py: the rewritten strided JIT kernels compute what MLX's originals do, for every stride."""

import ctypes
import shutil
import subprocess

import mlx.core as mx
import numpy as np
import pytest

from abot.platform import kernels, prepare

# A kernel in the form MLX 0.32's CPU JIT emits for exp(a + b - c) over 2-D strided inputs (the op structs
# stand in for MLX's preamble).
KERNEL = """#include <cmath>
#include <cstdint>
struct Add { float operator()(float a, float b) { return a + b; } };
struct Subtract { float operator()(float a, float b) { return a - b; } };
struct Exp { float operator()(float a) { return std::exp(a); } };
extern "C"  {
void Kf4IAddf4OExp_VVV_f4f4f4_0_strided_2(int* shape, int64_t** strides, void** args) {
  float* A = (float*)args[0];
  const int64_t* A_strides = strides[1];
  float* B = (float*)args[1];
  const int64_t* B_strides = strides[2];
  float* C = (float*)args[2];
  const int64_t* C_strides = strides[3];
  float* D = (float*)args[3];
  for (int i0 = 0; i0 < shape[0]; ++i0) {
  for (int i1 = 0; i1 < shape[1]; ++i1) {
  float tmp_A = *A;
  float tmp_B = *B;
  float tmp_C = *C;
  float tmp_E = Add()(tmp_A, tmp_B);
  float tmp_F = Subtract()(tmp_E, tmp_C);
  float tmp_D = Exp()(tmp_F);
  *D++ = tmp_D;
  A += A_strides[1];
  B += B_strides[1];
  C += C_strides[1];
  }
  A += A_strides[0];
  A -= A_strides[1] * shape[1];
  B += B_strides[0];
  B -= B_strides[1] * shape[1];
  C += C_strides[0];
  C -= C_strides[1] * shape[1];
  }
}
}
"""
NAME = "Kf4IAddf4OExp_VVV_f4f4f4_0_strided_2"


def test_the_innermost_loop_gets_a_vector_version_and_keeps_the_original():
    new = kernels.rewrite(KERNEL)
    assert "(A_strides[1] == 0 || A_strides[1] == 1)" in new and "abot_buf_B" in new
    assert "  float tmp_A = *A;" in new  # MLX's loop, for any other stride
    assert kernels.rewrite(new.replace("*D++", "D[0]")) == new.replace("*D++", "D[0]")  # unknown form: as is


def _build(tmp_path, source, tag):
    src, lib = tmp_path / f"{tag}.cpp", tmp_path / f"lib{tag}.so"
    src.write_text(source)
    subprocess.run(["g++", "-O3", "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    return getattr(ctypes.CDLL(str(lib)), NAME)


def _call(kernel, a, b, c):
    """Run the kernel like MLX does: element strides per input, broadcast dims at stride 0."""
    out = np.empty(np.broadcast_shapes(a.shape, b.shape, c.shape), np.float32)
    views = [np.broadcast_to(x, out.shape) for x in (a, b, c)]
    strides = [(ctypes.c_int64 * 2)(*(s // 4 for s in v.strides)) for v in views]
    stride_ptrs = (ctypes.POINTER(ctypes.c_int64) * 4)(None, *(ctypes.cast(s, ctypes.POINTER(ctypes.c_int64)) for s in strides))
    args = (ctypes.c_void_p * 4)(*(v.ctypes.data for v in views), out.ctypes.data)
    kernel((ctypes.c_int * 2)(*out.shape), stride_ptrs, args)
    return out


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_rewritten_kernel_matches_the_original_for_every_stride_pattern(tmp_path):
    original, rewritten = _build(tmp_path, KERNEL, "orig"), _build(tmp_path, kernels.rewrite(KERNEL), "new")
    rng = np.random.default_rng(0)
    full = rng.standard_normal((7, 1300)).astype(np.float32)  # rows longer than a 512-element chunk
    row = rng.standard_normal((7, 1)).astype(np.float32)  # inner stride 0: one value per row
    col = rng.standard_normal((1, 1300)).astype(np.float32)  # outer stride 0
    transposed = np.ascontiguousarray(rng.standard_normal((1300, 7)).astype(np.float32)).T  # inner stride 7
    for a, b, c in [(full, row, col), (row, full, row), (full, full, full), (col, row, row), (transposed, row, full)]:
        expected = np.exp(a + b - c)
        np.testing.assert_allclose(_call(original, a, b, c), expected, rtol=1e-6)
        np.testing.assert_array_equal(_call(rewritten, a, b, c), _call(original, a, b, c))


@pytest.mark.skipif(not prepare().jit.startswith("-march"), reason="abot's JIT wrapper not in use here")
def test_mlx_compiled_broadcasts_through_the_wrapper_match_numpy():
    """MLX's own strided kernels, as built on this machine, on row/column broadcasts and a transposed input."""
    rng = np.random.default_rng(1)
    a, b, c = (rng.standard_normal(s).astype(np.float32) for s in [(4, 6, 700), (4, 6, 1), (700,)])
    t = rng.standard_normal((700, 6)).astype(np.float32)
    f = mx.compile(lambda a, b, c, t: (mx.exp(a + b - c) * mx.where(a > 0, b, c), a - t.T))
    got = f(*(mx.array(x) for x in (a, b, c, t)))
    np.testing.assert_allclose(got[0], np.exp(a + b - c) * np.where(a > 0, b, c), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], a - t.T, rtol=1e-6)


# MLX's contiguous form of (a > b).astype(float32) * a.
BOOL_KERNEL = """#include <cstddef>
#include <cstdint>
struct Greater { bool operator()(float a, float b) { return a > b; } };
struct Multiply { float operator()(float a, float b) { return a * b; } };
extern "C"  {
void Cb1IGreaterf4OMultiply_VV_f4f4_0_contiguous(int* shape, int64_t** strides, void** args) {
  float* A = (float*)args[0];
  float* B = (float*)args[1];
  float* C = (float*)args[2];
  const size_t size = (size_t)args[3];
  for (size_t i = 0; i < size; ++i) {
  float tmp_A = A[i];
  float tmp_B = B[i];
  bool tmp_D = Greater()(tmp_A, tmp_B);
  float tmp_E = static_cast<float>(tmp_D);
  int32_t tmp_F = static_cast<int32_t>(tmp_B);
  float tmp_C = Multiply()(tmp_E, tmp_A) + static_cast<float>(tmp_F);
  C[i] = tmp_C;
  }
}
}
"""


def test_bool_casts_become_selects_and_nothing_else_changes():
    new = kernels.bool_casts(BOOL_KERNEL)
    assert "float tmp_E = static_cast<float>(tmp_D ? 1.0f : 0.0f);" in new
    assert "static_cast<int32_t>(tmp_B);" in new and "static_cast<float>(tmp_F)" in new  # not bools: as they were


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_bool_cast_kernel_matches_the_original(tmp_path):
    results = []
    for tag, source in [("orig", BOOL_KERNEL), ("new", kernels.bool_casts(BOOL_KERNEL))]:
        src, lib = tmp_path / f"{tag}.cpp", tmp_path / f"lib{tag}.so"
        src.write_text(source)
        subprocess.run(["g++", "-O3", "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
        kernel = ctypes.CDLL(str(lib)).Cb1IGreaterf4OMultiply_VV_f4f4_0_contiguous
        a, b = (np.random.default_rng(i).standard_normal(1000).astype(np.float32) * 3 for i in (0, 1))
        out = np.empty_like(a)
        kernel(None, None, (ctypes.c_void_p * 4)(a.ctypes.data, b.ctypes.data, out.ctypes.data, a.size))
        results.append(out)
    np.testing.assert_array_equal(results[0], (a > b).astype(np.float32) * a + b.astype(np.int32).astype(np.float32))
    np.testing.assert_array_equal(results[1], results[0])


@pytest.mark.skipif(not prepare().jit.startswith("-march"), reason="abot's JIT wrapper not in use here")
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16, mx.int32, mx.uint8])
def test_mlx_compiled_bool_casts_match_numpy(dtype):
    """Comparisons and bool arrays cast to numbers, contiguous and broadcast, as built through the wrapper."""
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((5, 600)).astype(np.float32), rng.standard_normal((5, 1)).astype(np.float32)
    mask, t = rng.random((5, 600)) > 0.5, rng.standard_normal((600, 5)).astype(np.float32)
    f = mx.compile(lambda a, b, m, t: ((a > b).astype(dtype), m.astype(dtype), (a > t.T).astype(dtype) * 3))
    got = [np.array(x.astype(mx.float32)) for x in f(*(mx.array(x) for x in (a, b, mask, t)))]
    np.testing.assert_array_equal(got[0], (a > b).astype(np.float32))
    np.testing.assert_array_equal(got[1], mask.astype(np.float32))
    np.testing.assert_array_equal(got[2], (a > t.T).astype(np.float32) * 3)
