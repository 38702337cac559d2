"""The Triton attention kernel against the plain-PyTorch definition, forward and all three gradients.
On CPU (CI) the kernels run under TRITON_INTERPRET=1 at small shapes in fp32 and fp16; the `gpu` tests
run the real SD shapes in bf16 on a CUDA device."""
import pytest
import torch

from minidream.kernels.attention import flash_attention, head_chunks
from minidream.models.attention import TRITON_TESTED, math_attention, triton_release

# below the triton the kernels are checked with, --attention triton refuses in one line (test_train_options)
pytestmark = pytest.mark.skipif(triton_release() < TRITON_TESTED, reason="triton older than the kernels need")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def check(B, H, N, M, D, dtype, tol, scale=None, device=DEVICE, seed=0, unet_layout=False):
    g = torch.Generator(device).manual_seed(seed)
    if unet_layout:  # what the UNet passes: a (B, n, H·D) projection viewed per head, not contiguous
        q, k, v = (torch.randn(B, n, H * D, generator=g, device=device).to(dtype).view(B, n, H, D).transpose(1, 2)
                   .detach().requires_grad_() for n in (N, M, M))
    else:
        q, k, v = (torch.randn(B, H, n, D, generator=g, device=device).to(dtype).requires_grad_() for n in (N, M, M))
    o = flash_attention(q, k, v, scale)
    do = torch.randn(o.shape, generator=g, device=device).to(dtype)
    o.backward(do)
    ref = [x.detach().float().requires_grad_() for x in (q, k, v)]
    r = math_attention(*ref, scale)
    r.backward(do.float())
    errs = {}
    pairs = (("out", o, r), ("dq", q.grad, ref[0].grad), ("dk", k.grad, ref[1].grad), ("dv", v.grad, ref[2].grad))
    for name, got, want in pairs:
        assert got.shape == want.shape and got.dtype == dtype
        errs[name] = ((got.float() - want).abs().max() / want.abs().max()).item()
    assert max(errs.values()) <= tol, errs
    return errs


# (B, H, N, M, D): non-power-of-two head dims, 77 keys, lengths that are not multiples of the block
SHAPES = [(1, 2, 37, 37, 40), (2, 1, 20, 77, 40), (1, 1, 50, 77, 80), (1, 2, 33, 19, 64), (1, 1, 17, 24, 160),
          (1, 1, 16, 77, 128), (2, 2, 9, 5, 80),
          # enough queries per key block that the dK/dV pass splits them into chunks (partial sums)
          (1, 2, 150, 20, 40), (2, 1, 97, 77, 80),
          # a head dim that is not a multiple of 8: no alignment promise (ALIGN = 1)
          (1, 1, 13, 29, 20)]


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_fp32(shape):
    check(*shape, torch.float32, tol=1e-5)


@pytest.mark.parametrize("shape", SHAPES[:5])
def test_kernel_fp16(shape):
    # fp16 inputs, fp32 accumulation; the error is fp16 rounding of the output and of P before P·V (~2^-11)
    check(*shape, torch.float16, tol=4e-3)


@pytest.mark.parametrize("shape", [(2, 2, 37, 37, 40), (1, 2, 150, 77, 80)])
def test_kernel_unet_layout(shape):
    check(*shape, torch.float32, tol=1e-5, unet_layout=True)


def test_kernel_scale_argument():
    check(1, 1, 20, 30, 64, torch.float32, tol=1e-5, scale=0.37)


@pytest.mark.parametrize("shape", [pytest.param((1, 2, 19, 77, 40), marks=pytest.mark.slow),  # dK/dV whole
                                   (1, 2, 150, 20, 40)])  # dK/dV in partial sums, then copied to k's and v's layout
def test_custom_ops_pass_opcheck(shape):
    """The forward and backward ops against torch.library's checks: the fake implementations give the real outputs'
    shapes, dtypes and strides, autograd is registered, nothing mutates its inputs, the ops trace under
    make_fx / torch.compile (interpreter on CPU)."""
    from minidream.kernels.attention import flash_attention_backward_op, flash_attention_op
    B, H, N, M, D = shape
    g = torch.Generator(DEVICE).manual_seed(0)
    q, k, v = (torch.randn(B, n, H * D, generator=g, device=DEVICE).view(B, n, H, D).transpose(1, 2)
               .requires_grad_() for n in (N, M, M))
    torch.library.opcheck(flash_attention_op, (q, k, v, D ** -0.5))
    o, lse = (t.detach() for t in flash_attention_op(q, k, v, D ** -0.5))
    do = torch.randn(o.shape, generator=g, device=DEVICE)
    torch.library.opcheck(flash_attention_backward_op, (q.detach(), k.detach(), v.detach(), o, lse, do,
                                                        D ** -0.5))


def test_output_and_gradients_keep_the_unet_layout():
    """O comes out (B, N, H, D) in memory, so the UNet's transpose+reshape to (B, N, H·D) is a view; dQ/dK/dV have
    their inputs' strides, so the projections' backward needs no copy either."""
    B, H, N, M, D = 2, 2, 24, 77, 40
    q, k, v = (torch.randn(B, n, H * D).view(B, n, H, D).transpose(1, 2).requires_grad_() for n in (N, M, M))
    o = flash_attention(q, k, v)
    assert o.transpose(1, 2).is_contiguous()
    y = o.transpose(1, 2).reshape(B, N, H * D)
    assert y.data_ptr() == o.data_ptr()  # a view
    y.square().sum().backward()
    for x in (q, k, v):
        assert x.grad.stride() == x.stride()


def test_torch_compile_traces_through_the_kernel():
    """torch.compile (Inductor) of a function that calls the kernel: one graph, no break, the same output and
    gradients as eager."""
    import torch._dynamo.testing
    q, k, v = (torch.randn(1, 2, n, 40, requires_grad=True) for n in (24, 77, 77))

    def f(q, k, v):
        return (flash_attention(q * 2, k, v) + 1).square().sum()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, backend=counter, fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(f(q, k, v), (q, k, v))
    assert counter.frame_count == 1
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_query_chunks_split_only_when_keys_are_few():
    from minidream.kernels.attention import query_chunks
    q = torch.empty(1, 2, 150, 40)
    assert query_chunks(q, 20) == (3, 64)  # 4 programs from key blocks alone: split the 150 queries
    assert query_chunks(q, 4096)[0] == 1  # 512 key-block programs: no split


def test_head_dim_chunks_waste_little():
    assert [head_chunks(d) for d in (40, 64, 80, 128, 160)] == [(32, 16), (64, 0), (64, 16), (128, 0), (128, 32)]


def test_bad_shapes_are_refused():
    q = torch.zeros(1, 2, 8, 40)
    with pytest.raises(ValueError, match="shapes"):
        flash_attention(q, torch.zeros(1, 2, 8, 32), torch.zeros(1, 2, 8, 32))
    with pytest.raises(ValueError, match="dtypes"):
        flash_attention(q, q.half(), q.half())


def test_unet_with_triton_backend_matches_sdpa(sd1_dir):
    """A whole tiny UNet forward + backward through the kernel (self- and 77-key cross-attention)."""
    from minidream.formats import diffusers_layout
    from minidream.models.attention import set_attention_backend
    from tests.conftest import max_rel_err
    unet = diffusers_layout.load_unet(sd1_dir / "unet").requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    results = {}
    for backend in ("sdpa", "triton"):
        unet.zero_grad()
        set_attention_backend(unet, backend)
        out = unet(x, torch.tensor([3, 900]), ctx)
        out.square().mean().backward()
        results[backend] = (out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters()})
    assert max_rel_err(results["triton"][0], results["sdpa"][0]) <= 1e-5
    for n, gr in results["sdpa"][1].items():
        assert max_rel_err(results["triton"][1][n], gr) <= 1e-4, n


@pytest.mark.slow  # ~1 min (aot_eager) and ~2 min (Inductor) under the interpreter; the suite keeps the op-level test
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_unet_with_triton_backend_compiles(sd1_dir, backend):
    """`--attention triton --compile`: torch.compile traces the UNet through the kernel's custom ops (no graph break
    at any attention) and gives the eager forward and gradients. (test_torch_compile_traces_through_the_kernel keeps
    the same property in the default suite, on one attention call.)"""
    import torch._dynamo.testing
    from minidream.formats import diffusers_layout
    from minidream.models.attention import set_attention_backend
    from tests.conftest import max_rel_err
    unet = set_attention_backend(diffusers_layout.load_unet(sd1_dir / "unet").requires_grad_(True), "triton")
    g = torch.Generator().manual_seed(0)
    x, ctx, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g), torch.tensor([3, 900])
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    results = {}
    for name, net in (("eager", unet), ("compiled", torch.compile(unet, backend=counter, fullgraph=True))):
        unet.zero_grad()
        out = net(x, t, ctx)
        out.square().mean().backward()
        results[name] = (out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters()})
    assert counter.frame_count == 1  # one graph: fullgraph=True would have raised at a break
    assert max_rel_err(results["compiled"][0], results["eager"][0]) <= 1e-5
    for n, gr in results["eager"][1].items():
        assert max_rel_err(results["compiled"][1][n], gr) <= 1e-4, n


# ------------------------------------------------------------------------------------------------
# On a GPU: the SD shapes themselves, bf16, against the fp32 definition and against SDPA's own bf16 error.

SD_SHAPES = {  # name: (B, H, N, M, D)
    "sd1-self-4096-d40": (2, 8, 4096, 4096, 40), "sd1-cross-4096-d40": (2, 8, 4096, 77, 40),
    "sd1-self-1024-d80": (2, 8, 1024, 1024, 80), "sd1-cross-1024-d80": (2, 8, 1024, 77, 80),
    "sd1-self-256-d160": (2, 8, 256, 256, 160), "sd1-self-64-d160": (2, 8, 64, 64, 160),
    "sd2-self-4096-d64": (2, 5, 4096, 4096, 64), "sd2-cross-1024-d64": (2, 10, 1024, 77, 64),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(SD_SHAPES))
def test_kernel_bf16_sd_shapes(name):
    # bf16 keeps 8 bits of mantissa: rounding of the inputs, of P before P·V and of the output is ~2^-8
    # relative; 3e-2 of the output scale leaves room for the sums. In the UNet's layout, as trained.
    errs = check(*SD_SHAPES[name], torch.bfloat16, tol=3e-2, device="cuda", unet_layout=True)
    print(name, errs)


def test_kernels_compile_for_hopper(tmp_path):
    """What a GPU would launch at every SD shape builds for sm_90 (H100/H200) with the installed triton, without
    spilling registers, within shared memory, on wgmma tensor-core instructions and with vector loads that the
    loop pipelines. Runs in a child process: the compiler needs the kernels un-interpreted."""
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "compile.json"
    r = subprocess.run([sys.executable, "-m", "minidream.kernels.compile_check", "--out", str(out)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert out.exists(), r.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert len(rows) == 30 and r.returncode == 0, [x for x in rows if x["spills"] or not x["fits_shared"]]
    assert all(x["wgmma"] for x in rows)
    assert all(x["async_copies"] > 0 for x in rows if x["kernel"] == "fwd" and x["N"] > 77)
