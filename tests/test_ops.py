"""wavenet_ae.ops: compiled kernels vs the pure-PyTorch references.

Tolerances
  encode: exact (integer classes). Kernels and references compute in float64 in the same order with no
          FMA contraction; a mismatch means the kernel changed the math, not rounding noise.
  decode: float32 output, rtol 3e-7 / atol 1e-9 (about 2 float32 ulp; both sides round a float64 value).
  round trip (quantization, not kernel error): |x - dec(enc(x))| <= (1 + mu|x|) ((1 + mu)^(1/mu) - 1) / mu.
"""

import os
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
    """Every op, on a device where the build has no kernel for it (here: the output loss, as on CUDA
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
    from wavenet_ae import _C
    print(f"_C: cpu_capability={_C.cpu_capability()}, has_cuda={_C.has_cuda()}")
    assert _C.cpu_capability() in ("avx512", "avx2", "neon", "generic")
    cuda_expected = (
        torch.version.cuda is not None
        and os.path.exists("/usr/local/cuda/bin/nvcc")
        and os.environ.get("WAVENET_AE_SKIP_CUDA") != "1"
    )
    if cuda_expected:
        assert _C.has_cuda(), "nvcc and a CUDA torch are present but _C was built CPU-only"
        assert ops.has_kernel("mu_law_encode", "cuda"), "wavenet_ae::mu_law_encode has no CUDA kernel registered"
