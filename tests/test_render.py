"""The volume renderer against closed forms, and the fast paths against their reference twins."""

from __future__ import annotations

import math

import pytest
import torch

from sds3d.cameras import orbit_cameras
from sds3d.render._reference import composite_reference, hash_grid_encode_reference
from sds3d.render.volume import composite, render
from sds3d.representations import hashgrid_triton
from sds3d.representations.encodings import HashGridConfig
from sds3d.representations.nerf import BackgroundConfig

# A camera on +X at distance 2.5 looking at the origin; its centre ray runs along −X and spends
# exactly 2 units in the scene cube [−1, 1]³. With 200 samples the bins are 0.01 wide.
NUM_SAMPLES = 200


def _camera(size: int = 3):
    return orbit_cameras(
        torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([2.5]), torch.tensor([10.0]), size, size
    )


def _slab(sigma: float, half_thickness: float):
    return lambda p: torch.where(
        p[:, 0].abs() < half_thickness, torch.full_like(p[:, 0], sigma), torch.zeros_like(p[:, 0])
    )


def test_constant_density_slab_has_opacity_one_minus_exp(field_factory):
    sigma, thickness = 3.0, 0.5
    out = render(
        field_factory(_slab(sigma, thickness / 2)), BackgroundConfig().build(), _camera(), NUM_SAMPLES
    )
    centre = out.opacity[0, 0, 1, 1].item()
    assert centre == pytest.approx(1 - math.exp(-sigma * thickness), rel=1e-4)


def test_empty_space_returns_the_background_exactly(field_factory):
    bg = BackgroundConfig(kind="solid", color=(0.2, 0.4, 0.6)).build()
    out = render(field_factory(lambda p: torch.zeros_like(p[:, 0])), bg, _camera(5), 16)
    assert torch.equal(out.rgb, torch.tensor([0.2, 0.4, 0.6]).reshape(1, 3, 1, 1).expand(1, 3, 5, 5))
    assert torch.equal(out.opacity, torch.zeros(1, 1, 5, 5))


def test_opaque_slab_depth_is_its_distance(field_factory):
    out = render(field_factory(_slab(1e4, 0.25)), BackgroundConfig().build(), _camera(), NUM_SAMPLES)
    # The front face is at x = 0.25, i.e. 2.25 from the camera; the first sample inside is half a bin in.
    assert out.opacity[0, 0, 1, 1].item() == pytest.approx(1.0, abs=1e-6)
    assert out.depth[0, 0, 1, 1].item() == pytest.approx(2.25 + 0.005, abs=1e-4)


def test_albedo_shows_through_an_opaque_slab(field_factory):
    out = render(
        field_factory(_slab(1e4, 0.25), albedo=(0.1, 0.7, 0.3)), BackgroundConfig().build(), _camera(), 64
    )
    assert torch.allclose(out.rgb[0, :, 1, 1], torch.tensor([0.1, 0.7, 0.3]), atol=1e-5)


def test_lambertian_slab_facing_a_head_light(field_factory):
    # A smooth slab whose density gradient points along −X on its front face: normal +X, towards the light.
    field = field_factory(lambda p: 1e3 * torch.sigmoid(-40 * (p[:, 0].abs() - 0.25)), albedo=(0.5, 0.5, 0.5))
    cam = _camera()
    out = render(field, BackgroundConfig().build(), cam, NUM_SAMPLES, shading="lambertian",
                 light_positions=torch.tensor([[100.0, 0.0, 0.0]]), ambient=0.1)  # fmt: skip
    assert out.rgb[0, 0, 1, 1].item() == pytest.approx(0.5, abs=0.01)  # ρ·(a + (1 − a)·1)
    tl = render(field, BackgroundConfig().build(), cam, NUM_SAMPLES, shading="textureless",
                light_positions=torch.tensor([[0.0, 100.0, 0.0]]), ambient=0.1)  # fmt: skip
    assert tl.rgb[0, 0, 1, 1].item() == pytest.approx(0.1, abs=0.02)  # light at 90°: ambient only, ρ = 1


def test_composite_matches_its_reference_twin_in_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    density = (torch.rand(7, 33, generator=g) * 5).requires_grad_(True)
    color = torch.rand(7, 33, 4, generator=g).requires_grad_(True)
    deltas = torch.rand(7, 33, generator=g) * 0.1
    fast, w_fast = composite(density, color, deltas)
    ref, w_ref = composite_reference(density, color, deltas)
    assert torch.allclose(fast, ref, atol=1e-6) and torch.allclose(w_fast, w_ref, atol=1e-6)
    probe = torch.rand(7, 4, generator=g)
    gd_fast, gc_fast = torch.autograd.grad((fast * probe).sum(), [density, color])
    gd_ref, gc_ref = torch.autograd.grad((ref * probe).sum(), [density, color])
    assert torch.allclose(gd_fast, gd_ref, atol=1e-5) and torch.allclose(gc_fast, gc_ref, atol=1e-6)


def test_composited_colour_has_the_finite_difference_gradient_in_density():
    """rgb = Σ w_i c_i + (1 − Σ w_i)·bg: the density gradient includes the background term (a
    detached opacity would drop it, which only a gradient check can see)."""
    from sds3d.render.volume import _shade_and_composite

    g = torch.Generator().manual_seed(0)
    r, n = 3, 6
    density = (torch.rand(r, n, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    albedo = torch.rand(r, n, 3, generator=g, dtype=torch.float64)
    points = torch.rand(r, n, 3, generator=g, dtype=torch.float64)
    t = torch.linspace(1, 2, n, dtype=torch.float64).expand(r, n)
    deltas = torch.full((r, n), 0.2, dtype=torch.float64)
    bg = torch.tensor([[1.0, 0.0, 0.5]], dtype=torch.float64).expand(r, 3)
    hit = torch.ones(r, dtype=torch.float64)
    probe = torch.rand(r, 3, generator=g, dtype=torch.float64)

    def f(d):
        rgb = _shade_and_composite(d, albedo, hit, None, points, t, deltas, bg, None, r, "albedo", 0.1)[0]
        return (rgb * probe).sum()

    (grad,) = torch.autograd.grad(f(density), density)
    h = 1e-6
    numeric = torch.zeros_like(grad)
    for idx in range(r * n):
        e = torch.zeros(r * n, dtype=torch.float64)
        e[idx] = h
        e = e.view(r, n)
        numeric.view(-1)[idx] = (f(density.detach() + e) - f(density.detach() - e)) / (2 * h)
    assert torch.allclose(grad, numeric, atol=1e-7)


@pytest.mark.parametrize("log2_table_size", [19, 12])  # all levels dense; most levels hashed
def test_hash_grid_matches_its_reference_twin_in_values_and_gradients(log2_table_size):
    grid = HashGridConfig(
        num_levels=4, base_resolution=4, max_resolution=64, log2_table_size=log2_table_size
    ).build()
    torch.nn.init.normal_(grid.tables)
    x = torch.rand(300, 3, generator=torch.Generator().manual_seed(1))
    x[0] = torch.tensor([1.0, 0.0, 1.0])  # the cube's faces
    fast, ref = grid(x), hash_grid_encode_reference(grid, x)
    assert torch.allclose(fast, ref, atol=1e-5)
    probe = torch.randn_like(fast)
    (g_fast,) = torch.autograd.grad((fast * probe).sum(), grid.tables)
    (g_ref,) = torch.autograd.grad((ref * probe).sum(), grid.tables)
    assert torch.allclose(g_fast, g_ref, atol=1e-5)
    assert grid.resolutions[0] == 4 and grid.resolutions[-1] == 64


def test_nerf_starts_as_a_density_blob_and_has_outward_normals():
    from sds3d.representations.nerf import HashGridNeRFConfig

    nerf = HashGridNeRFConfig().build()
    d = nerf.density(torch.tensor([[0.0, 0.0, 0.0], [0.9, 0.0, 0.0], [1.5, 0.0, 0.0]]))
    assert d[0] > 5 and d[1] < 0.01 and d[2] == 0  # outside the bound: zero
    _, n = nerf.normals(torch.tensor([[0.3, 0.0, 0.0], [0.0, 0.0, -0.3]]), create_graph=False)
    assert n[0, 0] > 0.9 and n[1, 2] < -0.9


def test_inference_rendering_in_chunks_matches_the_autograd_path():
    """Under no_grad the renderer queries the field (and its normals) in chunks; same result."""
    from sds3d.render import volume
    from sds3d.representations.nerf import HashGridNeRFConfig

    torch.manual_seed(0)
    nerf = HashGridNeRFConfig().build()
    cam = _camera(24)
    lights = torch.tensor([[3.0, 1.0, 2.0]])
    kwargs = dict(shading="lambertian", light_positions=lights, random_background=False)
    with_grad = render(nerf, BackgroundConfig().build(), cam, 32, **kwargs)
    old = volume.INFERENCE_CHUNK
    volume.INFERENCE_CHUNK = 1000  # several chunks
    try:
        with torch.no_grad():
            chunked = render(nerf, BackgroundConfig().build(), cam, 32, **kwargs)
    finally:
        volume.INFERENCE_CHUNK = old
    assert torch.allclose(with_grad.rgb.detach(), chunked.rgb, atol=1e-5)
    assert torch.allclose(with_grad.normal.detach(), chunked.normal, atol=1e-5)


def _blob_only_nerf(**kwargs):
    """A NeRF whose MLP outputs zero: τ = softplus(blob(x)), so −∇τ/‖∇τ‖ = x/‖x‖ exactly."""
    from sds3d.representations.nerf import HashGridNeRFConfig

    nerf = HashGridNeRFConfig(grid=HashGridConfig(num_levels=4, max_resolution=32), **kwargs).build()
    with torch.no_grad():
        nerf.mlp[-1].weight.zero_()
        nerf.mlp[-1].bias.zero_()
    return nerf


def _twins(a, b):
    """Two NeRFs with a's weights."""
    b.load_state_dict(a.state_dict())
    return a, b


def _field_normals_and_grads(nerf, points):
    """Density, normals, and the gradients of a fixed random loss on density, albedo and normals
    with respect to the hash tables and the first MLP layer."""
    probe = torch.randn(points.shape[0], 3, generator=torch.Generator().manual_seed(1)).to(points.device)
    field, n = nerf.normals(points, create_graph=True)
    loss = field.density.sum() * 1e-3 + (field.albedo * probe).sum() + (n * probe).sum()
    grads = torch.autograd.grad(loss, [nerf.encoding.tables, nerf.mlp[0].weight])
    return field.density.detach(), n.detach(), grads


@pytest.mark.parametrize(
    "normal_type, atol",
    [("analytic", 1e-5), ("closed_form", 1e-5), ("finite_difference", 1e-3), ("forward_difference", 0.03)],
)
def test_normals_of_the_density_blob_point_radially_outward(normal_type, atol):
    points = torch.tensor([[0.3, 0.0, 0.0], [0.0, -0.2, 0.1], [0.1, 0.2, -0.25], [-0.4, 0.1, 0.3]])
    _, n = _blob_only_nerf(normal_type=normal_type).normals(points, create_graph=False)
    expected = points / points.norm(dim=-1, keepdim=True)
    assert torch.allclose(n.detach(), expected, atol=atol)
    if normal_type == "forward_difference":  # O(ε): not as close as the central difference
        assert not torch.allclose(n.detach(), expected, atol=1e-4)


def test_finite_difference_normals_train_the_hash_grid_without_a_second_backward():
    """Shading losses reach the grid through the 6 neighbour queries (first-order autograd)."""
    from sds3d.representations.nerf import HashGridNeRFConfig

    torch.manual_seed(0)
    grid = HashGridConfig(num_levels=4, max_resolution=32)
    nerf = HashGridNeRFConfig(grid=grid, normal_type="finite_difference").build()
    points = torch.rand(256, 3) - 0.5
    _, n = nerf.normals(points, create_graph=False)
    (grad,) = torch.autograd.grad(n[:, 0].sum(), nerf.encoding.tables)
    assert grad.abs().sum() > 0 and torch.isfinite(grad).all()


@pytest.mark.parametrize("normal_type", ["finite_difference", "forward_difference", "closed_form"])
def test_compiled_nerf_matches_the_eager_one_in_values_and_gradients(normal_type):
    """The compiled field query (the GPU fast path) against its eager twin, on the CPU."""
    import dataclasses

    from sds3d.representations.nerf import HashGridNeRFConfig

    torch.manual_seed(0)
    config = HashGridNeRFConfig(
        grid=HashGridConfig(num_levels=4, max_resolution=32, init_scale=0.5), normal_type=normal_type
    )
    eager, compiled = _twins(config.build(), dataclasses.replace(config, compile=True).build())
    points = torch.rand(2048, 3) * 1.6 - 0.8
    (d_eager, n_eager, g_eager), (d_compiled, n_compiled, g_compiled) = (
        _field_normals_and_grads(nerf, points) for nerf in (eager, compiled)
    )
    assert torch.allclose(d_compiled, d_eager, atol=1e-4, rtol=1e-4)
    assert torch.allclose(n_compiled, n_eager, atol=1e-4)
    for a, b in zip(g_eager, g_compiled, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3)
    with pytest.raises(ValueError, match="second backward"):
        dataclasses.replace(config, normal_type="analytic", compile=True).build()


def test_closed_form_normals_equal_autograd_normals_in_values_and_parameter_gradients():
    """The chain rule written out (first-order autograd) against autograd of the density with a
    second backward, on a NeRF with non-trivial tables and MLP."""
    from sds3d.representations.nerf import HashGridNeRFConfig

    torch.manual_seed(0)
    grid = HashGridConfig(num_levels=6, max_resolution=64, log2_table_size=12, init_scale=0.5)
    autograd_nerf, closed = _twins(
        HashGridNeRFConfig(grid=grid).build(),
        HashGridNeRFConfig(grid=grid, normal_type="closed_form").build(),
    )
    points = torch.rand(3000, 3) * 1.8 - 0.9
    (d_auto, n_auto, g_auto), (d_closed, n_closed, g_closed) = (
        _field_normals_and_grads(nerf, points) for nerf in (autograd_nerf, closed)
    )
    assert torch.allclose(d_closed, d_auto, atol=1e-5)
    assert torch.allclose(n_closed, n_auto, atol=1e-4)
    for a, b in zip(g_auto, g_closed, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3)


needs_triton = pytest.mark.skipif(not hashgrid_triton.available(), reason="the Triton kernels need CUDA")


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| over max |b|."""
    return float((a - b).detach().abs().max() / b.abs().max().clamp_min(1e-12))


@needs_triton
@pytest.mark.parametrize("log2_table_size", [19, 12])  # most levels dense; most levels hashed
def test_triton_hash_grid_matches_its_pytorch_twin_in_values_and_table_gradients(log2_table_size):
    import dataclasses

    config = HashGridConfig(num_levels=8, base_resolution=4, max_resolution=256,
                            log2_table_size=log2_table_size, init_scale=0.5, kernel="torch")  # fmt: skip
    torch.manual_seed(0)
    ref, fast = config.build().cuda(), dataclasses.replace(config, kernel="triton").build().cuda()
    fast.load_state_dict(ref.state_dict())
    x = torch.rand(5000, 3, device="cuda")
    x[0] = torch.tensor([1.0, 0.0, 1.0])  # the cube's faces
    x[1] = torch.tensor([0.5, 0.25, 0.125])  # on grid lines of every level
    (e_ref, de_ref), (e_fast, de_fast) = ref.forward_with_gradient(x), fast.forward_with_gradient(x)
    # Float rounding only (the trilinear weights multiply in another order): ~1e-5 of the largest value.
    assert _relative_error(e_fast, e_ref) < 1e-4 and _relative_error(de_fast, de_ref) < 1e-4
    assert _relative_error(fast(x), ref(x)) < 1e-4
    p, q = torch.randn_like(e_ref), torch.randn_like(de_ref)
    for with_gradient in (True, False):
        grads = []
        for grid in (ref, fast):
            e, de = grid.forward_with_gradient(x) if with_gradient else (grid(x), None)
            loss = (e * p).sum() + ((de * q).sum() if de is not None else 0)
            grads.append(torch.autograd.grad(loss, grid.tables)[0])
        assert grads[0].abs().sum() > 0
        assert _relative_error(grads[1], grads[0]) < 1e-4


class _CountingLaunch:
    """Wraps a Triton kernel: `kernel[grid](...)` launches are recorded in `calls`."""

    def __init__(self, kernel, name: str, calls: list[str]):
        self.kernel, self.name, self.calls = kernel, name, calls

    def __getitem__(self, grid):
        self.calls.append(self.name)
        return self.kernel[grid]


@needs_triton
def test_compiled_nerf_with_triton_kernels_matches_the_eager_pytorch_one(monkeypatch):
    """The fast-sd field query (compiled, closed-form normals, Triton hash grid) against eager
    PyTorch: density, normals, and gradients of tables and MLP; both kernels really ran."""
    import dataclasses

    from sds3d.representations.nerf import HashGridNeRFConfig

    calls: list[str] = []
    for name in ("_hash_grid_fwd", "_hash_grid_bwd"):
        monkeypatch.setattr(
            hashgrid_triton, name, _CountingLaunch(getattr(hashgrid_triton, name), name, calls)
        )

    torch.manual_seed(0)
    grid = HashGridConfig(
        num_levels=16, log2_table_size=19, max_resolution=512, init_scale=0.1, kernel="torch"
    )
    config = HashGridNeRFConfig(grid=grid, normal_type="closed_form")
    eager, fast = _twins(
        config.build().cuda(),
        dataclasses.replace(config, compile=True, grid=dataclasses.replace(grid, kernel="triton"))
        .build()
        .cuda(),
    )
    points = torch.rand(4096, 3, device="cuda") * 1.6 - 0.8
    (d_eager, n_eager, g_eager), (d_fast, n_fast, g_fast) = (
        _field_normals_and_grads(nerf, points) for nerf in (eager, fast)
    )
    assert torch.allclose(d_fast, d_eager, atol=1e-4, rtol=1e-4)
    # Normals: unit vectors; where ∇τ nearly cancels, rounding turns them, so a few may differ more.
    off = (n_fast - n_eager).norm(dim=-1)
    assert off.median() < 1e-4 and (off < 1e-3).float().mean() > 0.99
    for a, b in zip(g_eager, g_fast, strict=True):
        assert _relative_error(b, a) < 1e-3
    assert "_hash_grid_fwd" in calls and "_hash_grid_bwd" in calls


def test_triton_hash_grid_says_why_it_cannot_run():
    grid = HashGridConfig(num_levels=2, max_resolution=32, kernel="triton").build()
    with pytest.raises(RuntimeError, match="cannot run here"):
        grid(torch.rand(10, 3))


@pytest.mark.parametrize("shading", ["albedo", "lambertian"])
def test_compiled_render_tail_matches_the_eager_one_in_values_and_gradients(shading):
    """Shading, compositing and background as one compiled region (the training render of a compiled
    NeRF) against the eager function, on the CPU: outputs and gradients to density, albedo, normals."""
    from sds3d.render import volume

    torch.manual_seed(0)
    b, hw, n = 2, 64, 16
    r = b * hw
    inputs = {
        "density": torch.rand(r, n) * 5,
        "albedo": torch.rand(r, n, 3),
        "sample_normals": torch.nn.functional.normalize(torch.randn(r, n, 3), dim=-1),
    }
    hit = torch.rand(r) > 0.2
    t = torch.sort(torch.rand(r, n) * 2 + 1, dim=1).values
    points = torch.randn(r, n, 3)
    deltas = torch.full((r, n), 2 / n)
    bg, lights = torch.rand(r, 3), torch.randn(b, 3) * 3
    results = []
    for fn in (volume._shade_and_composite, volume._shade_and_composite_compiled):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        rgb, opacity, depth, normal, weights, density = fn(
            leaves["density"], leaves["albedo"], hit, leaves["sample_normals"], points, t, deltas, bg,
            lights, hw, shading, 0.1,
        )  # fmt: skip
        outs = (rgb, opacity, depth, normal, weights, density)
        loss = sum((o * torch.linspace(0.5, 1.5, o.numel()).view_as(o)).sum() for o in outs)
        grads = torch.autograd.grad(loss, list(leaves.values()))
        results.append((outs, grads))
    (outs_e, grads_e), (outs_c, grads_c) = results
    for a, c in zip((*outs_e, *grads_e), (*outs_c, *grads_c), strict=True):
        assert torch.allclose(a, c, atol=1e-5, rtol=1e-4)
    assert grads_e[2].abs().sum() > 0  # the normals' gradient: the composited normal (and shading)
