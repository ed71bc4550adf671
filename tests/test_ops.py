"""wavenet_ae.ops: compiled kernels vs the pure-PyTorch references.

Tolerances
  encode: exact (integer classes). Kernels and references compute in float64 in the same order with no
          FMA contraction; a mismatch means the kernel changed the math, not rounding noise.
  decode: float32 output, rtol 3e-7 / atol 1e-9 (about 2 float32 ulp; both sides round a float64 value).
  round trip (quantization, not kernel error): |x - dec(enc(x))| <= (1 + mu|x|) ((1 + mu)^(1/mu) - 1) / mu.
"""

import os
import subprocess
import sys
import warnings

import pytest
import torch

from wavenet_ae import ops

DECODE_TOL = dict(rtol=3e-7, atol=1e-9)

HAVE_GPU = torch.cuda.is_available()
needs_ext = pytest.mark.skipif(not ops.HAVE_EXT, reason="wavenet_ae._C not built")
needs_cuda_kernels = pytest.mark.skipif(
    not (HAVE_GPU and ops.has_kernel("mu_law_encode", "cuda")), reason="needs a GPU and the CUDA build of wavenet_ae._C"
)

DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda_kernels)]
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INT_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]
SHAPES = [(), (0,), (1,), (7,), (3, 1001), (2, 1, 4097), (4, 0, 5), (1, 40_003)]
N_QUANTS = [256, 2, 3, 255, 1024, 65536]


def _audio(shape, dtype, device, seed=0):
    """Mostly in [-1, 1], some outside, plus the special values when there is room."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 0.6
    flat = x.view(-1)
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 1.5, -7.0, 1e-30, -1e-30, float("inf"), float("-inf")],
                           dtype=torch.float64)
    k = min(flat.numel(), special.numel())
    flat[:k] = special[:k]
    return x.to(dtype=dtype, device=device)


def _boundary_points(n_quant, device):
    """float32 values within a few ulp of every class boundary of the encoder."""
    mu = n_quant - 1
    k = torch.arange(1, mu + 1, dtype=torch.float64)
    y = (2 * k - 1) / mu - 1  # (q - 0.5) mapped back to y
    xb = (torch.sign(y) * (torch.pow(1.0 + mu, y.abs()) - 1) / mu).to(torch.float32)
    pts = [xb]
    up, down = xb, xb
    for _ in range(3):
        up = torch.nextafter(up, torch.full_like(up, 2.0))
        down = torch.nextafter(down, torch.full_like(down, -2.0))
        pts += [up, down]
    return torch.cat(pts).to(device)


def _assert_classes_equal(got, want, what):
    assert got.dtype == torch.int64 and got.shape == want.shape, (got.dtype, got.shape, want.shape)
    assert got.device == want.device
    if got.numel():
        diff = (got.cpu() - want.cpu()).abs()
        print(f"{what}: max |diff| = {diff.max().item()}, mismatches = {(diff != 0).sum().item()} / {diff.numel()}")
    assert torch.equal(got.cpu(), want.cpu()), what


def _assert_decoded_close(got, want, what):
    assert got.dtype == torch.float32 and got.shape == want.shape, (got.dtype, got.shape, want.shape)
    assert got.device == want.device
    if got.numel():
        diff = (got.double().cpu() - want.double().cpu()).abs()
        print(f"{what}: max |diff| = {diff.max().item():.3g}, mean |diff| = {diff.mean().item():.3g}")
    torch.testing.assert_close(got.cpu(), want.cpu(), **DECODE_TOL, msg=what)


# ------------------------------------------------------------------------------------------------
# kernel vs reference
# ------------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_encode_matches_ref(device, dtype, shape):
    x = _audio(shape, dtype, device)
    got = torch.ops.wavenet_ae.mu_law_encode(x, 256)
    _assert_classes_equal(got, ops.mu_law_encode_ref(x, 256), f"encode {device} {dtype} {shape}")


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_quant", N_QUANTS)
def test_encode_matches_ref_n_quant_and_boundaries(device, n_quant):
    x = torch.cat([_audio((5003,), torch.float32, device, seed=n_quant), _boundary_points(n_quant, device)])
    got = torch.ops.wavenet_ae.mu_law_encode(x, n_quant)
    _assert_classes_equal(got, ops.mu_law_encode_ref(x, n_quant), f"encode {device} n_quant={n_quant}")
    assert got.min().item() >= 0 and got.max().item() <= n_quant - 1


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_encode_every_float16(device):
    """All 65536 float16 bit patterns (NaN, inf, subnormals, every boundary neighbourhood at fp16 grain)."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16).to(device)
    got = torch.ops.wavenet_ae.mu_law_encode(x, 256)
    _assert_classes_equal(got, ops.mu_law_encode_ref(x, 256), f"encode all float16 on {device}")


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_encode_non_contiguous(device):
    x = _audio((64, 33), torch.float32, device).t()  # (33, 64), strides (1, 33)
    assert not x.is_contiguous()
    got = torch.ops.wavenet_ae.mu_law_encode(x, 256)
    _assert_classes_equal(got, ops.mu_law_encode_ref(x, 256), f"encode non-contiguous {device}")
    assert got.is_contiguous()


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", INT_DTYPES)
@pytest.mark.parametrize("n_quant", N_QUANTS)
def test_decode_matches_ref(device, dtype, n_quant):
    info = torch.iinfo(dtype)
    q = torch.arange(-3, n_quant + 3, dtype=torch.int64)  # every class plus out-of-range on both sides
    q = q.clamp(info.min, info.max).to(dtype).to(device)
    got = torch.ops.wavenet_ae.mu_law_decode(q, n_quant)
    _assert_decoded_close(got, ops.mu_law_decode_ref(q, n_quant), f"decode {device} {dtype} n_quant={n_quant}")


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
def test_decode_shapes(device, shape):
    q = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(1)).to(device)
    got = torch.ops.wavenet_ae.mu_law_decode(q, 256)
    _assert_decoded_close(got, ops.mu_law_decode_ref(q, 256), f"decode {device} {shape}")


@needs_ext
def test_encode_large_parallel():
    """Large enough for many at::parallel_for chunks."""
    x = _audio((1 << 20) + 3, torch.float32, "cpu", seed=3)
    _assert_classes_equal(torch.ops.wavenet_ae.mu_law_encode(x, 256), ops.mu_law_encode_ref(x, 256), "large")


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    """Schema, fake (meta) kernels and dispatcher registration are consistent."""
    x = _audio((3, 17), torch.float32, device)
    q = torch.randint(0, 256, (3, 17), device=device)
    torch.library.opcheck(torch.ops.wavenet_ae.mu_law_encode.default, (x, 256))
    torch.library.opcheck(torch.ops.wavenet_ae.mu_law_decode.default, (q, 256))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_argument_errors(device):
    x = torch.zeros(4, device=device)
    with pytest.raises(RuntimeError, match="x must be a floating-point tensor"):
        torch.ops.wavenet_ae.mu_law_encode(x.long(), 256)
    with pytest.raises(RuntimeError, match="q must be an integer tensor"):
        torch.ops.wavenet_ae.mu_law_decode(x, 256)
    with pytest.raises(RuntimeError, match="n_quant must be in"):
        torch.ops.wavenet_ae.mu_law_encode(x, 1)
    with pytest.raises(RuntimeError, match="n_quant must be in"):
        torch.ops.wavenet_ae.mu_law_decode(x.long(), 65537)


# ------------------------------------------------------------------------------------------------
# CUDA specifics
# ------------------------------------------------------------------------------------------------


@needs_cuda_kernels
def test_cuda_matches_cpu_kernel():
    x = _audio((2, 100_003), torch.float32, "cpu", seed=7)
    q_cpu = torch.ops.wavenet_ae.mu_law_encode(x, 256)
    q_gpu = torch.ops.wavenet_ae.mu_law_encode(x.cuda(), 256)
    _assert_classes_equal(q_gpu.cpu(), q_cpu, "encode cuda vs cpu kernel")
    _assert_decoded_close(torch.ops.wavenet_ae.mu_law_decode(q_gpu, 256).cpu(),
                          torch.ops.wavenet_ae.mu_law_decode(q_cpu, 256), "decode cuda vs cpu kernel")


@needs_cuda_kernels
def test_cuda_side_stream():
    """The kernels run on the current stream, not the default one."""
    x = _audio((1, 1 << 18), torch.float32, "cuda", seed=8)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        q = torch.ops.wavenet_ae.mu_law_encode(x, 256)
        y = torch.ops.wavenet_ae.mu_law_decode(q, 256)
    s.synchronize()
    _assert_classes_equal(q, ops.mu_law_encode_ref(x, 256), "encode on side stream")
    _assert_decoded_close(y, ops.mu_law_decode_ref(q, 256), "decode on side stream")


@needs_cuda_kernels
def test_cuda_wrapper_uses_cuda_kernel():
    assert ops.has_kernel("mu_law_encode", "cuda") and ops.has_kernel("mu_law_encode", torch.device("cuda"))
    x = _audio((10,), torch.float32, "cuda")
    assert ops.mu_law_encode(x).device.type == "cuda"


# ------------------------------------------------------------------------------------------------
# public wrappers, references, fallback (run with or without the extension)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_quant", [256, 1024])
def test_round_trip_error_bound(n_quant):
    mu = n_quant - 1
    x = torch.cat([torch.linspace(-1, 1, 200_001, dtype=torch.float64), _audio((10_000,), torch.float64, "cpu")])
    x = x.clamp(-1, 1).to(torch.float32)
    x_hat = ops.mu_law_decode(ops.mu_law_encode(x, n_quant), n_quant)
    err = (x_hat.double() - x.double()).abs()
    bound = (1 + mu * x.double().abs()) * ((1 + mu) ** (1 / mu) - 1) / mu + 1e-6
    worst = (err / bound).max().item()
    print(f"n_quant={n_quant}: max err {err.max().item():.3g}, max err/bound {worst:.3f}")
    assert worst <= 1.0
    assert err.max().item() <= (1 + mu) * ((1 + mu) ** (1 / mu) - 1) / mu + 1e-6  # ~0.0221 for 256 classes


def test_known_values():
    x = torch.tensor([-1.0, 0.0, 1.0, -5.0, 5.0, float("nan")])
    assert ops.mu_law_encode(x, 256).tolist() == [0, 128, 255, 0, 255, 128]
    y = ops.mu_law_decode(torch.tensor([0, 255]), 256)
    assert y.tolist() == [-1.0, 1.0]
    q = ops.mu_law_encode(torch.linspace(-1, 1, 100_000), 256)
    assert torch.all(q[1:] >= q[:-1]), "encode must be monotone"
    assert torch.equal(q.unique(), torch.arange(256)), "every class must be reachable"


def test_wrappers_match_refs_and_flag():
    x = _audio((2, 301), torch.float32, "cpu")
    q = ops.mu_law_encode(x)
    assert torch.equal(q, ops.mu_law_encode_ref(x))
    torch.testing.assert_close(ops.mu_law_decode(q), ops.mu_law_decode_ref(q), **DECODE_TOL)
    old = ops.USE_EXT
    try:
        ops.USE_EXT = False
        assert torch.equal(ops.mu_law_encode(x), q)
    finally:
        ops.USE_EXT = old


def test_ref_type_errors():
    with pytest.raises(TypeError):
        ops.mu_law_encode_ref(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError):
        ops.mu_law_decode_ref(torch.zeros(3))
    with pytest.raises(ValueError):
        ops.mu_law_encode_ref(torch.zeros(3), n_quant=1)


def test_fallback_warns_once_and_require_ext(monkeypatch):
    monkeypatch.setattr(ops._ext, "HAVE_EXT", False)
    monkeypatch.setattr(ops._ext, "EXT_IMPORT_ERROR", ImportError("simulated"))
    monkeypatch.setattr(ops._ext, "_warned", set())
    x = _audio((5,), torch.float32, "cpu")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        q1 = ops.mu_law_encode(x)
        ops.mu_law_decode(q1)
        ops.mu_law_encode(x)
    msgs = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1, msgs
    assert ops.REBUILD_CMD in msgs[0]
    assert torch.equal(q1, ops.mu_law_encode_ref(x))
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation -e ."):
        ops.require_ext()


def test_an_op_without_a_kernel_for_the_device_warns_once_and_falls_back(monkeypatch):
    """Every op, on a device where the build has no kernel for it (here: linear_cross_entropy, as on CUDA
    today), says so once and runs its reference."""
    monkeypatch.setattr(ops._ext, "_warned", set())
    monkeypatch.setattr(ops._ext, "has_kernel", lambda op, dev: False)
    g = torch.Generator().manual_seed(0)
    h, w, b = torch.randn(2, 4, 5, generator=g), torch.randn(7, 4, generator=g), torch.randn(7, generator=g)
    target = torch.randint(0, 7, (2, 5), generator=g)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        losses = [ops.linear_cross_entropy(h, w, b, target) for _ in range(3)]
    msgs = [str(r.message) for r in rec if issubclass(r.category, RuntimeWarning)]
    assert len(msgs) == 1 and "no cpu kernel for linear_cross_entropy" in msgs[0], msgs
    assert torch.equal(losses[0], ops.linear_cross_entropy_ref(h, w, b, target))


def test_extension_built():
    """CI guard: with WAVENET_AE_REQUIRE_EXT=1 a missing or silently CPU-only extension fails the run."""
    if os.environ.get("WAVENET_AE_REQUIRE_EXT") != "1":
        pytest.skip("set WAVENET_AE_REQUIRE_EXT=1 to require the compiled extension")
    assert ops.HAVE_EXT, f"wavenet_ae._C failed to import: {ops.EXT_IMPORT_ERROR!r}"
    ops.require_ext()
    info = ops.build_info()
    print(f"build_info: {info}")
    cuda_expected = (
        torch.version.cuda is not None
        and os.path.exists("/usr/local/cuda/bin/nvcc")
        and os.environ.get("WAVENET_AE_SKIP_CUDA") != "1"
    )
    if cuda_expected:
        assert info["cuda"], "nvcc and a CUDA torch are present but _C was built CPU-only"
        assert ops.has_kernel("mu_law_encode", "cuda"), "wavenet_ae::mu_law_encode has no CUDA kernel registered"


@needs_ext
def test_build_info_tells_what_runs():
    """build_info() reports what the kernels do here, each entry checked against another source."""
    from wavenet_ae import _C
    info = ops.build_info()
    print(info)
    assert info["abi"] == ops.ABI == ops._ext.ABI
    assert info["torch"] == torch.__version__.split("+")[0], "built against another torch: rebuild"
    assert set(info["cpu_paths"]) == {"wavenet_generate", "residual_layer", "linear_cross_entropy", "gemm"}
    # the generation kernel's own answer, and the residual kernel's own description
    assert info["cpu_paths"]["wavenet_generate"] == ops.wavenet_generate_cpu_path("auto")
    cpu_info = ops.residual_layer_cpu_info()
    assert f"elementwise={info['cpu_paths']['residual_layer']} " in cpu_info, cpu_info
    assert f"gemm={info['cpu_paths']['gemm']}" in cpu_info, cpu_info
    # the AVX2 paths run exactly where cpuid has AVX2 and FMA; torch's own dispatch agrees about this CPU
    avx2 = "avx2" if info["cpu_has_avx2"] else "generic"
    assert info["cpu_paths"]["residual_layer"] == info["cpu_paths"]["linear_cross_entropy"] == avx2
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert info["cpu_has_avx2"]
    if info["simd_runtime"] == []:                 # not x86: no run-time selected code at all
        assert not info["cpu_has_avx2"]
    assert (_C.cpu_capability() == "avx2") == info["cpu_has_avx2"]
    assert set(info["simd_compiled"]) <= {"sse2", "sse4_2", "avx", "avx2", "fma", "avx512f", "neon"}
    if info["openmp"]:
        assert info["threads"] == torch.get_num_threads()
    # CUDA kernels built <=> registered; archs named as nvcc targets
    assert info["cuda"] == ops.has_kernel("mu_law_encode", "cuda") == _C.has_cuda()
    if info["cuda"]:
        assert info["cuda_archs"] and all(a.startswith(("sm_", "compute_")) for a in info["cuda_archs"])
    else:
        assert info["cuda_archs"] == []


@needs_ext
def test_build_info_reports_the_gemm_path_the_environment_selects():
    code = "from wavenet_ae import ops; print(ops.build_info()['cpu_paths']['gemm'], ops.residual_layer_cpu_info())"
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, WAVENET_AE_CPU_GEMM="aten"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[0] == "aten" and "gemm=aten" in r.stdout, r.stdout


def test_abi_mismatch_counts_as_not_loaded():
    """An extension built from other sources (another ABI number) is not used: the error names both
    numbers and the rebuild command."""
    class Old:                                      # a build from before build_info() existed
        pass

    class Newer:
        @staticmethod
        def build_info():
            return {"abi": ops.ABI + 1}

    err = ops._ext.check_abi(Old)
    assert isinstance(err, ImportError)
    assert f"built from older sources (ABI 0, need {ops.ABI}): rebuild with: {ops.REBUILD_CMD}" in str(err)
    assert f"built from newer sources (ABI {ops.ABI + 1}, need {ops.ABI})" in str(ops._ext.check_abi(Newer))
    if ops.HAVE_EXT:
        assert ops._ext.check_abi(ops._ext._C) is None
        ext, err = ops._ext.load_extension(need=ops.ABI + 1)   # the real build, checked against another number
        assert ext is None and f"(ABI {ops.ABI}, need {ops.ABI + 1})" in str(err)


def test_abi_mismatch_makes_the_package_fall_back_to_the_references():
    """End to end, in a fresh process whose wavenet_ae._C is an old build (no build_info): the package
    loads, counts the extension as absent, runs the references with one warning naming the rebuild
    command, and require_ext() raises with the ABI numbers."""
    code = """
import sys, types, warnings
sys.modules["wavenet_ae._C"] = types.ModuleType("wavenet_ae._C")    # an old build: no build_info()
import torch
from wavenet_ae import ops
assert not ops.HAVE_EXT and ops._ext._C is None
assert "built from older sources (ABI 0, need %d): rebuild with: " % ops.ABI in str(ops.EXT_IMPORT_ERROR)
assert not ops.has_kernel("mu_law_encode", "cpu")
x = torch.linspace(-1, 1, 11)
with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    q = ops.mu_law_encode(x)
assert torch.equal(q, ops.mu_law_encode_ref(x))
msgs = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
assert len(msgs) == 1 and "ABI 0" in msgs[0] and ops.REBUILD_CMD in msgs[0], msgs
try:
    ops.require_ext()
except RuntimeError as e:
    assert "ABI 0, need" in str(e), e
else:
    raise AssertionError("require_ext() did not raise")
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def _gen_weights(device, n_quant=16, n_res=8, n_dil=4, n_skp=8, n_post=8, K=2, dilations=(1, 2)):
    g = torch.Generator().manual_seed(0)
    L = len(dilations)

    def r(*shape):
        return (0.3 * torch.randn(*shape, generator=g)).to(device)
    return ops.GenWeights(embed=r(n_quant, n_res), w_dil=r(L, K, n_res, 2 * n_dil), w_out=r(L, n_dil, n_res + n_skp),
                          b_out=r(L, n_res + n_skp), w_post1=r(n_skp, n_post), b_post1=r(n_post),
                          w_post2=r(n_post, n_quant), b_post2=r(n_quant), dilations=tuple(dilations))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_generate_rejects_bad_classes_before_touching_its_state(device):
    """wavenet_generate checks the classes in x_prev and forced (on the GPU without a sync before the
    launch): a bad one raises with the argument's name, and queues / x_prev are left as they were."""
    w = _gen_weights(device)
    B, S = 3, 5
    cond = torch.randn(B, S, 2 * 4 * len(w.dilations), device=device)
    u = torch.rand(B, S, device=device)
    queues = torch.randn(B, sum(w.queue_rows), w.n_res, device=device)
    good_x = torch.tensor([0, 7, 15], device=device)
    bad_forced = torch.full((B, S), -1, device=device)
    bad_forced[1, 4] = 16
    for x_prev, forced, match in ((torch.tensor([0, 16, 3], device=device), None, "x_prev classes"),
                                  (torch.tensor([0, -1, 3], device=device), None, "x_prev classes"),
                                  (good_x, bad_forced, "forced classes")):
        q0, x0 = queues.clone(), x_prev.clone()
        with pytest.raises(RuntimeError, match=match):
            ops.wavenet_generate(w, cond, u, forced, queues, x_prev, 0)
        assert torch.equal(queues, q0) and torch.equal(x_prev, x0)
    x_prev = good_x.clone()
    forced = torch.full((B, S), -1, device=device)
    forced[:, 0] = 15
    smp, _ = ops.wavenet_generate(w, cond, u, forced, queues, x_prev, 0)   # valid classes run
    assert torch.equal(smp[:, 0].cpu(), torch.full((B,), 15)) and torch.equal(x_prev, smp[:, -1])
