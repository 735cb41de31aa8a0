"""Jacobians of a small UNet denoiser: JVP/VJP against finite differences and jacfwd; Lanczos against eigh."""

import pytest
import torch

from imprint.models.ddpm import DDPMConfig, DDPMEnsemble, build_scheduler
from imprint.spectral.eigensolvers import (block_lanczos_eigsh, hutchinson_trace, lanczos_eigsh, lanczos_svd,
                                           symmetric_eigenvalues)
from imprint.spectral.operators import (BatchedJacobianOperator, batched_denoiser_map, dense_denoiser_jacobians,
                                        denoiser_jacobian, denoiser_map, make_probe_points)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


CFG = DDPMConfig(image_size=8, block_out_channels=(8, 16), norm_num_groups=4, n_classes=3, n_train_timesteps=50)


@pytest.fixture(scope="module")
def unet():
    # random weights, perturbed so the class embedding and output layer are not at their (zero) initial values
    model = DDPMEnsemble.initialise(CFG, [0]).model(0).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@pytest.fixture(scope="module")
def point():
    return torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


@pytest.mark.parametrize("target", ["epsilon", "x0", "denoiser"])
def test_jvp_and_vjp_match_central_finite_differences(unet, point, target):
    op = denoiser_jacobian(unet, CFG, point, t=20, label=1, target=target)
    fn = denoiser_map(unet, CFG, 20, 1, target)
    g = torch.Generator().manual_seed(3)
    v = torch.randn(64, generator=g, dtype=torch.float64)
    h = 1e-5
    with torch.no_grad():
        fd = (fn(op.x + h * v) - fn(op.x - h * v)) / (2 * h)
    torch.testing.assert_close(op.matvec(v), fd, rtol=1e-6, atol=1e-7)
    dense = op.dense()
    u = torch.randn(64, generator=g, dtype=torch.float64)
    torch.testing.assert_close(op.rmatvec(u), dense.T @ u, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.sym_matvec(u), 0.5 * (dense + dense.T) @ u, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.gram_matvec(u), dense.T @ (dense @ u), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.dense(chunk_size=10), dense, rtol=1e-10, atol=1e-12)
    forward = denoiser_jacobian(unet, CFG, point, t=20, label=1, target=target, forward_mode=True)
    torch.testing.assert_close(forward.matvec(v), op.matvec(v), rtol=1e-10, atol=1e-12)
    rows = torch.randn(5, 64, generator=g, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(rows), rows @ dense.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(forward.matmat(rows, chunk_size=2), rows @ dense.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.rmatmat(rows, chunk_size=3), rows @ dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.sym_matmat(rows), rows @ (0.5 * (dense + dense.T)), rtol=1e-10, atol=1e-12)


def test_the_three_targets_are_related_by_the_noise_schedule(unet, point):
    t = 30
    abar = float(build_scheduler(CFG).alphas_cumprod[t - 1])
    j_eps = denoiser_jacobian(unet, CFG, point, t, 0, "epsilon").dense()
    j_den = denoiser_jacobian(unet, CFG, point, t, 0, "denoiser").dense()
    j_x0 = denoiser_jacobian(unet, CFG, point, t, 0, "x0").dense()
    eye = torch.eye(64, dtype=torch.float64)
    torch.testing.assert_close(j_den, eye - (1 - abar) ** 0.5 * j_eps)
    torch.testing.assert_close(j_x0, j_den / abar**0.5)


def test_guided_jacobian_is_the_guided_combination(unet, point):
    w = 1.5
    guided = denoiser_jacobian(unet, CFG, point, 10, 2, "epsilon", guidance_weight=w).dense()
    cond = denoiser_jacobian(unet, CFG, point, 10, 2, "epsilon").dense()
    fn_null = lambda x: unet(x.reshape(1, 1, 8, 8), torch.tensor([9]), class_labels=torch.tensor([3])).sample.reshape(-1)  # noqa: E731
    from torch.func import jacfwd

    uncond = jacfwd(fn_null)(point.reshape(-1)).detach()
    torch.testing.assert_close(guided, (1 + w) * cond - w * uncond)


def test_batched_dense_jacobians_equal_one_at_a_time(unet):
    g = torch.Generator().manual_seed(4)
    xs = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    ts, labels = [5, 25, 50], [0, 2, 1]
    for target in ["epsilon", "denoiser", "x0"]:
        batched = dense_denoiser_jacobians(unet, CFG, xs, ts, labels, target)
        chunked = dense_denoiser_jacobians(unet, CFG, xs, ts, labels, target, max_rows=50)  # 1 probe, 50 rows
        torch.testing.assert_close(chunked, batched, rtol=1e-10, atol=1e-12)
        for i in range(3):
            single = denoiser_jacobian(unet, CFG, xs[i], ts[i], labels[i], target).dense()
            torch.testing.assert_close(batched[i], single, rtol=1e-10, atol=1e-12)


def test_lanczos_on_the_unet_jacobian_matches_dense_eigh_and_svd(unet, point):
    op = denoiser_jacobian(unet, CFG, point, 15, 1, "denoiser")
    dense = op.dense()
    res = lanczos_eigsh(op.sym_matvec, 64, 6, tol=1e-10, max_iter=64)
    torch.testing.assert_close(res.eigenvalues, symmetric_eigenvalues(dense)[:6], rtol=1e-8, atol=1e-9)
    sv = lanczos_svd(op.matvec, op.rmatvec, 64, 4, tol=1e-12, max_iter=64)
    torch.testing.assert_close(sv.eigenvalues, torch.linalg.svdvals(dense)[:4], rtol=1e-7, atol=1e-9)
    block = block_lanczos_eigsh(op.sym_matmat, 64, 6, block_size=3, tol=1e-10, max_basis=64)
    torch.testing.assert_close(block.eigenvalues, symmetric_eigenvalues(dense)[:6], rtol=1e-8, atol=1e-9)
    tr = hutchinson_trace(op.matvec, 64, 200, matmat=op.matmat)
    assert abs(tr.estimate - float(dense.trace())) < 5 * tr.standard_error + 1e-9


def test_probe_points_follow_the_forward_process(point):
    x0 = torch.stack([point, -point]).float()
    x_t, ts, labels = make_probe_points(x0, torch.tensor([0, 2]), [1, 40], CFG, seed=5)
    assert ts == [1, 1, 40, 40] and labels == [0, 2, 0, 2]
    again, _, _ = make_probe_points(x0, torch.tensor([0, 2]), [1, 40], CFG, seed=5)
    assert torch.equal(x_t, again)
    abar = build_scheduler(CFG).alphas_cumprod.double()
    noise = torch.randn((2, 2, 1, 8, 8), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    expected = abar[39].sqrt() * x0.double() + (1 - abar[39]).sqrt() * noise[1]
    torch.testing.assert_close(x_t[2:].double(), expected, rtol=1e-6, atol=1e-6)


def test_bad_probe_arguments_are_refused(unet, point):
    for t in (0, 51):
        with pytest.raises(ValueError, match=r"t=.*expected a value"):
            denoiser_jacobian(unet, CFG, point, t, 0)
        with pytest.raises(ValueError, match="probe_timesteps"):
            make_probe_points(point[None].float(), torch.tensor([0]), [t], CFG, seed=0)
    with pytest.raises(ValueError, match="label=3"):
        denoiser_jacobian(unet, CFG, point, 5, 3)
    with pytest.raises(ValueError, match="target"):
        denoiser_jacobian(unet, CFG, point, 5, 0, target="score")
    with pytest.raises(ValueError, match="x_t has shape"):
        denoiser_jacobian(unet, CFG, torch.zeros(1, 4, 4, dtype=torch.float64), 5, 0)
    with pytest.raises(ValueError, match="guidance_weight"):
        denoiser_jacobian(unet, CFG, point, 5, 0, guidance_weight=-1.0)


@pytest.mark.parametrize("target", ["epsilon", "x0", "denoiser"])
@pytest.mark.parametrize("w", [0.0, 1.5])
def test_batched_block_products_equal_the_dense_jacobian(unet, point, target, w):
    dense = denoiser_jacobian(unet, CFG, point, 20, 1, target, guidance_weight=w).dense()  # jacfwd
    sym = 0.5 * (dense + dense.T)
    op = denoiser_jacobian(unet, CFG, point, 20, 1, target, guidance_weight=w, block_size=5)
    assert isinstance(op, BatchedJacobianOperator) and not op.graphed
    g = torch.Generator().manual_seed(5)
    rows = torch.randn(12, 64, generator=g, dtype=torch.float64)  # two full blocks and a padded one
    torch.testing.assert_close(op.sym_matmat(rows), rows @ sym, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.matmat(rows), rows @ dense.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.rmatmat(rows), rows @ dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.sym_matmat(rows[:3]), rows[:3] @ sym, rtol=1e-10, atol=1e-12)  # kept forward
    v = rows[0]
    torch.testing.assert_close(op.matvec(v), dense @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.rmatvec(v), dense.T @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.sym_matvec(v), sym @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.dense(), dense, rtol=1e-10, atol=1e-12)


def test_batched_map_is_the_flat_map_row_by_row_and_moves_between_points(unet, point):
    batched = batched_denoiser_map(unet, CFG, 30, 2, "x0", guidance_weight=0.5)
    flat = denoiser_map(unet, CFG, 30, 2, "x0", guidance_weight=0.5)
    xs = torch.randn(4, 64, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(batched(xs), torch.stack([flat(x) for x in xs]), rtol=1e-12, atol=1e-12)
    op = denoiser_jacobian(unet, CFG, point, 30, 2, "x0", guidance_weight=0.5, block_size=8)
    op.sym_matvec(xs[0])
    op.set_point(xs[1])
    other = denoiser_jacobian(unet, CFG, xs[1].reshape(1, 8, 8), 30, 2, "x0", guidance_weight=0.5).dense()
    torch.testing.assert_close(op.dense(), other, rtol=1e-10, atol=1e-12)


def test_block_lanczos_on_batched_products_matches_dense_eigh(unet, point):
    op = denoiser_jacobian(unet, CFG, point, 15, 1, "denoiser", block_size=16)
    exact = symmetric_eigenvalues(op.dense())
    res = block_lanczos_eigsh(op.sym_matmat, 64, 6, block_size=16, tol=1e-10, max_basis=64, check_every=2)
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, exact[:6], rtol=1e-8, atol=1e-9)


def test_bad_batched_operator_arguments_are_refused(unet, point):
    with pytest.raises(ValueError, match="block_size"):
        denoiser_jacobian(unet, CFG, point, 5, 0, block_size=0)
    with pytest.raises(ValueError, match="cuda_graph"):
        denoiser_jacobian(unet, CFG, point, 5, 0, cuda_graph=True)
    with pytest.raises(ValueError, match="forward_mode"):
        denoiser_jacobian(unet, CFG, point, 5, 0, block_size=4, forward_mode=True)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda_graph=True: expected a model on a CUDA device"):
            denoiser_jacobian(unet, CFG, point, 5, 0, block_size=4, cuda_graph=True)
    fn = batched_denoiser_map(unet, CFG, 5, 0)
    with pytest.raises(ValueError, match="cuda_graph=True: expected x on a CUDA device"):
        BatchedJacobianOperator(fn, point.reshape(-1), 4, cuda_graph=True)
    op = BatchedJacobianOperator(fn, point.reshape(-1), 4)
    with pytest.raises(ValueError, match="rows have shape"):
        op.sym_matmat(torch.zeros(3, 63, dtype=torch.float64))
    with pytest.raises(ValueError, match="x has shape"):
        op.set_point(torch.zeros(63, dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_block_products_equal_eager_ones_on_cuda(unet, point):
    model = unet.cuda()
    try:
        eager = denoiser_jacobian(model, CFG, point, 20, 1, "denoiser", guidance_weight=1.0, block_size=4)
        graphed = denoiser_jacobian(model, CFG, point, 20, 1, "denoiser", guidance_weight=1.0, block_size=4,
                                    cuda_graph=True)
        rows = torch.randn(6, 64, generator=torch.Generator().manual_seed(7), dtype=torch.float64).cuda()
        torch.testing.assert_close(graphed.sym_matmat(rows), eager.sym_matmat(rows), rtol=1e-10, atol=1e-12)
        assert graphed.graphed
        other = point.reshape(-1).cuda() + 0.1
        graphed.set_point(other)
        eager.set_point(other)
        torch.testing.assert_close(graphed.sym_matmat(rows), eager.sym_matmat(rows), rtol=1e-10, atol=1e-12)
    finally:
        unet.cpu()
