"""Fused output layer + cross-entropy (ops.linear_cross_entropy) vs the reference (linear_cross_entropy_ref).

Ground truth is the reference in float64. float64: 1e-10 and torch.autograd.gradcheck on small shapes;
float32: loss 1e-5 relative, gradients 1e-4 of their largest entry (the kernel sums B*N products per
weight in tiles, in another order than the reference's matrix product).
"""
import pytest
import torch

from wavenet_ae import ops

needs_kernel = pytest.mark.skipif(not ops.has_kernel("linear_cross_entropy", "cpu"),
                                  reason="wavenet_ae._C without the linear_cross_entropy kernel")

# (B, n_in, N, n_quant, bias): tile edges (the kernel's tiles are 128 samples), batch 1, no bias, tiny preset
CASES = {"small": (2, 5, 7, 11, True), "tile_edges": (3, 16, 257, 40, True), "batch1": (1, 8, 130, 256, True),
         "no_bias": (2, 6, 129, 17, False), "tiny_like": (2, 64, 1280, 256, True)}


def make(B, n_in, N, C, bias, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, n_in, N, generator=g, dtype=torch.float64)
    w = torch.randn(C, n_in, generator=g, dtype=torch.float64) * 2 / n_in ** 0.5  # logits spread ~2
    b = torch.randn(C, generator=g, dtype=torch.float64) if bias else None
    target = torch.randint(0, C, (B, N), generator=g)
    return [None if t is None else t.to(dtype).requires_grad_() for t in (h, w, b)] + [target]


def loss_and_grads(fn, h, w, b, target, upstream=1.0):
    loss = fn(h, w, b, target)
    live = [t for t in (h, w, b) if t is not None]
    return loss.detach(), torch.autograd.grad(loss * upstream, live)


@needs_kernel
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(case, dtype):
    args = make(*CASES[case], dtype=dtype)
    want = loss_and_grads(ops.linear_cross_entropy_ref,
                          *[None if t is None or not t.is_floating_point() else t.detach().double().requires_grad_()
                            for t in args[:3]], args[3], upstream=0.7)
    assert ops.fused_linear_cross_entropy_available(args[0])
    got = loss_and_grads(ops.linear_cross_entropy, *args, upstream=0.7)
    tol_loss, tol_grad = (1e-10, 1e-10) if dtype == torch.float64 else (1e-5, 1e-4)
    assert got[0].dtype == dtype
    assert abs(got[0].double() - want[0]).item() <= tol_loss * abs(want[0]).item()
    for g, w_ in zip(got[1], want[1]):
        assert g.dtype == dtype
        assert (g.double() - w_).abs().max().item() <= tol_grad * max(1.0, w_.abs().max().item())


@needs_kernel
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(bias):
    h, w, b, target = make(2, 3, 9, 5, bias)
    fn = (lambda h, w, b: ops.linear_cross_entropy(h, w, b, target)) if bias else \
        (lambda h, w: ops.linear_cross_entropy(h, w, None, target))
    assert torch.autograd.gradcheck(fn, (h, w, b) if bias else (h, w))


@needs_kernel
def test_no_grad_gives_the_same_loss_and_skips_the_gradients():
    h, w, b, target = make(*CASES["tile_edges"], dtype=torch.float32)
    with torch.no_grad():
        loss = ops.linear_cross_entropy(h, w, b, target)
        _, g_h, g_w, g_b = torch.ops.wavenet_ae.linear_cross_entropy(h, w, b, target, False)
    assert g_h.numel() == g_w.numel() == g_b.numel() == 0
    assert torch.allclose(loss, ops.linear_cross_entropy(h, w, b, target).detach(), rtol=0, atol=0)


@needs_kernel
def test_deterministic_and_non_contiguous_input():
    h, w, b, target = make(*CASES["tile_edges"], dtype=torch.float32)
    a = loss_and_grads(ops.linear_cross_entropy, h, w, b, target)
    b2 = loss_and_grads(ops.linear_cross_entropy, h, w, b, target)
    assert torch.equal(a[0], b2[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b2[1]))
    # time-major storage seen as (B, n_in, N): the kernel copies it to rows of samples
    ht = h.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    c = loss_and_grads(ops.linear_cross_entropy, ht, w, b, target)
    assert torch.allclose(c[0], a[0], rtol=1e-6) and torch.allclose(c[1][0], a[1][0], atol=1e-7)


@needs_kernel
def test_bad_targets_and_shapes_are_clear_errors():
    h, w, b, target = make(2, 4, 10, 6, True, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"targets must lie in \[0, 6\)"):
        ops.linear_cross_entropy(h, w, b, target + 6)
    with pytest.raises(RuntimeError, match="w has 3 inputs"):
        ops.linear_cross_entropy(h, w[:, :3], b, target)
    with pytest.raises(RuntimeError, match="does not match h"):
        ops.linear_cross_entropy(h, w, b, target[:, :9])


@needs_kernel
def test_opcheck_schema_and_fake():
    h, w, b, target = [t.detach() for t in make(2, 4, 10, 6, True, dtype=torch.float32)]
    for need in (True, False):
        torch.library.opcheck(torch.ops.wavenet_ae.linear_cross_entropy.default, (h, w, b, target, need),
                              test_utils=("test_schema", "test_faketensor"))


def test_dispatch_flag_and_fallback(monkeypatch):
    h, w, b, target = make(2, 4, 10, 6, True, dtype=torch.float32)
    monkeypatch.setattr(ops, "USE_FUSED_LINEAR_CROSS_ENTROPY", False)
    assert not ops.fused_linear_cross_entropy_available(h)
    ref = ops.linear_cross_entropy(h, w, b, target)
    monkeypatch.setattr(ops, "USE_FUSED_LINEAR_CROSS_ENTROPY", True)
    assert ops.fused_linear_cross_entropy_available(h) == ops.has_kernel("linear_cross_entropy", "cpu")
    assert not ops.fused_linear_cross_entropy_available(h.bfloat16())  # no bf16 kernel: the reference runs
    assert torch.allclose(ops.linear_cross_entropy(h, w, b, target), ref, rtol=1e-5)


@needs_kernel
def test_aten_gemm_fallback_matches_reference():
    """WAVENET_AE_CPU_GEMM=aten: the kernel's products through at::mm instead of the exported BLAS."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, WAVENET_AE_CPU_GEMM="aten")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                        "test_matches_reference and (tile_edges or no_bias)"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "4 passed" in r.stdout, r.stdout[-2000:]


@needs_kernel
def test_kernel_is_unaffected_by_autocast():
    """Inside a CPU autocast region the fused loss and its gradients are the float32 ones of outside it
    (autocast falls through custom ops; the op excludes it for the products it makes inside)."""
    h, w, b, target = make(*CASES["tiny_like"], dtype=torch.float32)
    want = loss_and_grads(ops.linear_cross_entropy, h, w, b, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_and_grads(ops.linear_cross_entropy, h, w, b, target)
    for a, e in zip((got[0], *got[1]), (want[0], *want[1])):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)
