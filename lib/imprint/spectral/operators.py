"""The Jacobian of a diffusion denoiser with respect to its noisy input, matrix-free or dense.

Used by the self-consuming diffusion chapter (04). At a noisy image x_t (DDPM scaling,
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps), a timestep t in [1, T] and a class c, three maps are offered:
``epsilon``, the predicted noise eps_theta(x_t, t, c); ``x0``, the estimate
x0_hat = (x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t); and ``denoiser``,
D(x_t) = x_t - sqrt(1 - abar_t) eps_theta = sqrt(abar_t) x0_hat. The Jacobian of D with respect to x_t
equals the Jacobian of x0_hat with respect to y = x_t / sqrt(abar_t) = x0 + sigma z, sigma^2 = (1 - abar_t) / abar_t,
the variance-exploding form studied by Kadkhodaie et al. (2024); for the exact MMSE denoiser it is
Cov[x0 | y] / sigma^2 (Miyasawa / Tweedie), symmetric with eigenvalues in [0, 1] for most densities, and its
trace counts the directions along which the learned distribution still varies near y. Products with the
Jacobian come from ``torch.func`` (vector-Jacobian products, and Jacobian-vector products either in
forward mode or as the transpose of the former), or, for blocks of vectors, from plain autograd through one
batched pass over copies of x (the network treats every sample independently), optionally replayed as CUDA
graphs; the dense matrix from ``jacrev`` under ``vmap`` for many probe points at once.
"""

from __future__ import annotations

import warnings
from typing import Callable, Literal, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from imprint.models.ddpm import DDPMConfig, alphas_cumprod, check_guidance_weight, check_timestep
from imprint.runtime.checks import require_choice, require_int

Target = Literal["epsilon", "x0", "denoiser"]
TARGETS = ("epsilon", "x0", "denoiser")


def _coefficients(config: DDPMConfig, t: int) -> tuple[float, float]:
    abar = float(alphas_cumprod(config)[t - 1])
    return abar**0.5, (1.0 - abar) ** 0.5


def batched_denoiser_map(model: nn.Module, config: DDPMConfig, t: int, label: int, target: str = "denoiser",
                         guidance_weight: float = 0.0) -> Callable[[Float[Tensor, "b d"]], Float[Tensor, "b d"]]:
    """The map x_t -> target of ``model`` at timestep ``t`` in [1, T], applied to each row of ``[b, d]`` in one
    network call (row i of the output depends on row i of the input only: group normalisation is per sample).

    ``guidance_weight`` w > 0 uses the guided prediction (1 + w) eps(x, c) - w eps(x, null), both passes in one
    batch of 2b.
    """
    t = check_timestep(config, t, "t")
    require_choice("target", target, TARGETS)
    check_guidance_weight(guidance_weight)
    if not 0 <= int(label) < config.n_classes:
        raise ValueError(f"label={label!r}: expected a class in [0, {config.n_classes - 1}]")
    sqrt_abar, sqrt_one_minus = _coefficients(config, t)
    shape = config.image_shape
    w = float(guidance_weight)
    dev = next(model.parameters()).device
    t_index = torch.tensor([t - 1], device=dev)
    labels = torch.tensor([int(label), config.null_label] if w else [int(label)], device=dev)

    def eps(x: Tensor) -> Tensor:
        b = x.shape[0]
        img = x.reshape(b, *shape)
        lab = labels.repeat_interleave(b)
        if w:
            img = torch.cat([img, img])
        e = model(img, t_index.expand(lab.shape[0]), class_labels=lab).sample.reshape(lab.shape[0], -1)
        return (1 + w) * e[:b] - w * e[b:] if w else e

    if target == "epsilon":
        return eps
    if target == "denoiser":
        return lambda x: x - sqrt_one_minus * eps(x)
    return lambda x: (x - sqrt_one_minus * eps(x)) / sqrt_abar


def denoiser_map(model: nn.Module, config: DDPMConfig, t: int, label: int, target: str = "denoiser",
                 guidance_weight: float = 0.0) -> Callable[[Float[Tensor, " d"]], Float[Tensor, " d"]]:
    """The map x_t (flattened, ``[d]``) -> target (flattened) of ``model`` at timestep ``t`` in [1, T]: one row
    of :func:`batched_denoiser_map`."""
    batched = batched_denoiser_map(model, config, t, label, target, guidance_weight)
    return lambda x: batched(x.reshape(1, -1)).reshape(-1)


class JacobianOperator:
    """J = d fn / dx at ``x``: products J v and J^T u, one vector (rows of a block) at a time or vmapped.

    The forward pass runs once: J^T u replays its autograd graph (``torch.func.vjp``); J v is, by default,
    the vector-Jacobian product of the linear map u -> J^T u (reverse over reverse), which is also built
    once and replayed. ``forward_mode=True`` uses ``torch.func.jvp`` instead, recomputing the forward pass
    with dual numbers at every product: exact too, but slower for networks with group normalisation,
    whose forward-mode rule is a Python decomposition.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], x: Float[Tensor, " d"], forward_mode: bool = False):
        if x.dim() != 1:
            raise ValueError(f"x has shape {tuple(x.shape)}: expected a flat vector")
        self.fn, self.x = fn, x.detach()
        self.dim = x.numel()
        self.forward_mode = forward_mode
        self._vjp_fn = None
        self._jvp_fn = None

    def _transpose_product(self):
        if self._vjp_fn is None:
            from torch.func import vjp

            _, self._vjp_fn = vjp(self.fn, self.x)
        return self._vjp_fn

    def _product(self):
        if self._jvp_fn is None:
            from torch.func import vjp

            vjp_fn = self._transpose_product()
            # u -> J^T u is linear, so its vector-Jacobian product with v is J v, at any u
            _, self._jvp_fn = vjp(lambda u: vjp_fn(u)[0], torch.zeros_like(self.x))
        return self._jvp_fn

    def matvec(self, v: Float[Tensor, " d"]) -> Float[Tensor, " d"]:
        """J v."""
        v = v.to(self.x)
        if self.forward_mode:
            from torch.func import jvp

            return jvp(self.fn, (self.x,), (v,))[1].detach()
        return self._product()(v)[0].detach()

    def rmatvec(self, u: Float[Tensor, " d"]) -> Float[Tensor, " d"]:
        """J^T u."""
        return self._transpose_product()(u.to(self.x))[0].detach()

    def matmat(self, vs: Float[Tensor, "k d"], chunk_size: int | None = 64) -> Float[Tensor, "k d"]:
        """J applied to each row of ``vs`` (vmapped, ``chunk_size`` rows at a time): rows J v_i."""
        from torch.func import jvp, vmap

        vs = vs.to(self.x)
        if self.forward_mode:
            one = lambda v: jvp(self.fn, (self.x,), (v,))[1]  # noqa: E731
        else:
            product = self._product()
            one = lambda v: product(v)[0]  # noqa: E731
        return self._chunked(vmap(one), vs, chunk_size)

    def rmatmat(self, us: Float[Tensor, "k d"], chunk_size: int | None = 64) -> Float[Tensor, "k d"]:
        """J^T applied to each row of ``us``: rows J^T u_i."""
        from torch.func import vmap

        transpose = self._transpose_product()
        return self._chunked(vmap(lambda u: transpose(u)[0]), us.to(self.x), chunk_size)

    @staticmethod
    def _chunked(fn, rows: Tensor, chunk_size: int | None) -> Tensor:
        step = rows.shape[0] if chunk_size is None else chunk_size
        return torch.cat([fn(rows[i:i + step]).detach() for i in range(0, rows.shape[0], step)])

    def sym_matvec(self, v: Float[Tensor, " d"]) -> Float[Tensor, " d"]:
        """((J + J^T) / 2) v."""
        return 0.5 * (self.matvec(v) + self.rmatvec(v))

    def sym_matmat(self, vs: Float[Tensor, "k d"], chunk_size: int | None = 64) -> Float[Tensor, "k d"]:
        """((J + J^T) / 2) applied to each row of ``vs``."""
        return 0.5 * (self.matmat(vs, chunk_size) + self.rmatmat(vs, chunk_size))

    def gram_matvec(self, v: Float[Tensor, " d"]) -> Float[Tensor, " d"]:
        """J^T J v."""
        return self.rmatvec(self.matvec(v))

    def dense(self, chunk_size: int | None = None) -> Float[Tensor, "d d"]:
        """The full Jacobian ``[d_out, d_in]``: ``jacfwd`` when ``chunk_size`` is None, otherwise its rows
        J^T e_i from vmapped vector-Jacobian products, ``chunk_size`` at a time (one forward pass)."""
        if chunk_size is None:
            from torch.func import jacfwd

            return jacfwd(self.fn)(self.x).detach()
        eye = torch.eye(self.dim, dtype=self.x.dtype, device=self.x.device)
        return self.rmatmat(eye, chunk_size)


class BatchedJacobianOperator:
    """J = d fn / dx at ``x`` for a row-wise map ``fn`` (``[b, d] -> [b, d]``, row i of the output a function of
    row i of the input only), applied to ``block_size`` vectors at a time through one batched pass over copies of x.

    With X the b copies of x and Y = fn(X), the rows of J^T U are the gradient of <Y, U> with respect to X (one
    backward pass). G(W) = J^T W is linear in W, so the gradient of <G(W), V> with respect to W is J V (a
    backward pass through the differentiable backward pass); with W = V, one backward pass kept differentiable
    and one through it give both halves of the symmetric product (J V + J^T V) / 2. Every call processes whole
    blocks of ``block_size`` rows, the last one padded with zeros, so the network always sees the same batch and
    the forward pass at X is computed once per point. With ``cuda_graph=True`` (CUDA only) that forward pass and
    the symmetric product of one block are captured as two CUDA graphs on first use (the forward from a static
    copy of x, so :meth:`set_point` moves to another point without a new capture) and replayed, which removes
    the launch latency of the hundreds of small kernels in each product. If the capture fails, a warning is
    issued and the products stay eager (``graphed`` says which).
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], x: Float[Tensor, " d"], block_size: int = 32,
                 cuda_graph: bool = False):
        if x.dim() != 1:
            raise ValueError(f"x has shape {tuple(x.shape)}: expected a flat vector")
        self.block_size = require_int("block_size", block_size, minimum=1)
        if cuda_graph and x.device.type != "cuda":
            raise ValueError(f"cuda_graph=True: expected x on a CUDA device, got {x.device.type}")
        self.fn, self.x = fn, x.detach().clone()
        self.dim = x.numel()
        self.cuda_graph = bool(cuda_graph)
        self.graphed = False
        self._forward_pass = None
        self._graphs = None

    def set_point(self, x: Float[Tensor, " d"]) -> None:
        """Move to another point x (same shape); a captured graph is kept and its forward pass replayed."""
        if tuple(x.shape) != (self.dim,):
            raise ValueError(f"x has shape {tuple(x.shape)}: expected ({self.dim},)")
        self.x.copy_(x.detach())
        self._forward_pass = None
        if self._graphs is not None:
            self._graphs["forward"].replay()

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        xs = x.expand(self.block_size, self.dim).clone().requires_grad_(True)
        with torch.enable_grad():
            return xs, self.fn(xs)

    def _eager_forward(self) -> tuple[Tensor, Tensor]:
        if self._forward_pass is None:
            self._forward_pass = self._forward(self.x)
        return self._forward_pass

    @staticmethod
    def _sym_rows(xs: Tensor, ys: Tensor, vs: Tensor) -> tuple[Tensor, Tensor]:
        """Rows J^T v_i and J v_i (the forward graph of ``ys`` is kept for the next block)."""
        with torch.enable_grad():
            w = vs.detach().requires_grad_(True)
            jt_v = torch.autograd.grad(ys, xs, w, create_graph=True, retain_graph=True)[0]
            j_v = torch.autograd.grad(jt_v, w, vs)[0]
        return jt_v.detach(), j_v

    def _capture(self) -> None:
        # one side stream for the warm-up and both captures: backward kernels run on the stream of their forward
        stream = torch.cuda.Stream()
        static_in = torch.zeros(self.block_size, self.dim, dtype=self.x.dtype, device=self.x.device)
        try:
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up: allocator, cuDNN and cuBLAS set-up outside the capture
                xs, ys = self._forward(self.x)
                for _ in range(3):
                    self._sym_rows(xs, ys, static_in)
                del xs, ys
            torch.cuda.current_stream().wait_stream(stream)
            forward, product = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(forward, stream=stream):
                xs, ys = self._forward(self.x)
            with torch.cuda.graph(product, stream=stream):
                jt_v, j_v = self._sym_rows(xs, ys, static_in)
                static_out = 0.5 * (j_v + jt_v)
        except RuntimeError as err:
            warnings.warn(f"CUDA-graph capture of the block product failed ({err}); using eager products",
                          RuntimeWarning, stacklevel=3)
            self.cuda_graph = False
            return
        forward.replay()  # a capture records kernels without running them
        self._graphs = {"forward": forward, "product": product, "outputs": (xs, ys), "in": static_in,
                        "out": static_out}
        self.graphed = True

    def _blocks(self, rows: Tensor, block_fn: Callable[[Tensor], Tensor]) -> Tensor:
        rows = rows.to(self.x)
        if rows.dim() != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"rows have shape {tuple(rows.shape)}: expected [n, {self.dim}]")
        b, out = self.block_size, []
        for i in range(0, rows.shape[0], b):
            block = rows[i:i + b]
            n = block.shape[0]
            if n < b:
                block = torch.cat([block, block.new_zeros(b - n, self.dim)])
            out.append(block_fn(block)[:n])
        return torch.cat(out)

    def _sym_block(self, block: Tensor) -> Tensor:
        if self.cuda_graph and self._graphs is None:
            self._capture()
        if self._graphs is not None:
            self._graphs["in"].copy_(block)
            self._graphs["product"].replay()
            return self._graphs["out"].clone()
        jt_v, j_v = self._sym_rows(*self._eager_forward(), block)
        return 0.5 * (j_v + jt_v)

    def matmat(self, vs: Float[Tensor, "k d"]) -> Float[Tensor, "k d"]:
        """Rows J v_i."""
        return self._blocks(vs, lambda block: self._sym_rows(*self._eager_forward(), block)[1])

    def rmatmat(self, us: Float[Tensor, "k d"]) -> Float[Tensor, "k d"]:
        """Rows J^T u_i."""
        def block_fn(block: Tensor) -> Tensor:
            xs, ys = self._eager_forward()
            return torch.autograd.grad(ys, xs, block, retain_graph=True)[0]

        return self._blocks(us, block_fn)

    def sym_matmat(self, vs: Float[Tensor, "k d"]) -> Float[Tensor, "k d"]:
        """((J + J^T) / 2) applied to each row of ``vs`` (replaying the CUDA graph when there is one)."""
        return self._blocks(vs, self._sym_block)

    def matvec(self, v: Float[Tensor, " d"]) -> Float[Tensor, " d"]:
        """J v."""
        return self.matmat(v.reshape(1, -1))[0]

    def rmatvec(self, u: Float[Tensor, " d"]) -> Float[Tensor, " d"]:
        """J^T u."""
        return self.rmatmat(u.reshape(1, -1))[0]

    def sym_matvec(self, v: Float[Tensor, " d"]) -> Float[Tensor, " d"]:
        """((J + J^T) / 2) v."""
        return self.sym_matmat(v.reshape(1, -1))[0]

    def dense(self) -> Float[Tensor, "d d"]:
        """The full Jacobian ``[d_out, d_in]``: its rows J^T e_i, ``block_size`` at a time (one forward pass)."""
        return self.rmatmat(torch.eye(self.dim, dtype=self.x.dtype, device=self.x.device))


def denoiser_jacobian(model: nn.Module, config: DDPMConfig, x_t: Float[Tensor, "c h w"], t: int, label: int,
                      target: str = "denoiser", guidance_weight: float = 0.0, forward_mode: bool = False,
                      block_size: int | None = None, cuda_graph: bool = False
                      ) -> JacobianOperator | BatchedJacobianOperator:
    """The Jacobian operator of :func:`denoiser_map` at the noisy image ``x_t``: a :class:`JacobianOperator`
    (``torch.func`` products, one vector or vmapped), or with ``block_size`` a :class:`BatchedJacobianOperator`
    (blocks of that many vectors through one batched network pass; ``cuda_graph`` replays it as a CUDA graph)."""
    t = check_timestep(config, t, "t")
    if tuple(x_t.shape) != config.image_shape:
        raise ValueError(f"x_t has shape {tuple(x_t.shape)}: expected {config.image_shape}")
    if block_size is None:
        if cuda_graph:
            raise ValueError("cuda_graph=True: expected a block_size (CUDA graphs are for batched products)")
    else:
        require_int("block_size", block_size, minimum=1)
        if forward_mode:
            raise ValueError(f"forward_mode=True with block_size={block_size}: batched products are reverse mode")
    p = next(model.parameters())
    if cuda_graph and p.device.type != "cuda":
        raise ValueError(f"cuda_graph=True: expected a model on a CUDA device, got {p.device.type}")
    x = x_t.reshape(-1).to(device=p.device, dtype=p.dtype)
    if block_size is not None:
        return BatchedJacobianOperator(batched_denoiser_map(model, config, t, label, target, guidance_weight), x,
                                       block_size, cuda_graph)
    return JacobianOperator(denoiser_map(model, config, t, label, target, guidance_weight), x, forward_mode)


def dense_denoiser_jacobians(model: nn.Module, config: DDPMConfig, x_t: Float[Tensor, "p c h w"],
                             t: Sequence[int] | Int[Tensor, " p"], labels: Sequence[int] | Int[Tensor, " p"],
                             target: str = "denoiser", max_rows: int | None = None) -> Float[Tensor, "p d d"]:
    """Exact Jacobians at ``p`` probe points (``vmap`` over probes of ``jacrev``), conditional model.

    When all ``p * d`` rows fit in ``max_rows`` (default 2^17 / d, so the back-propagated activations stay
    near a constant size), one vmapped ``jacrev`` computes everything; otherwise each probe gets one forward
    pass and its rows J^T e_i are back-propagated ``max_rows`` at a time, which bounds the memory that a
    single batched call at 28x28 would blow up to gigabytes.
    """
    from torch.func import jacrev, vjp, vmap

    require_choice("target", target, TARGETS)
    if max_rows is not None:
        require_int("max_rows", max_rows, minimum=1)
    t_list = [check_timestep(config, int(v), "t") for v in torch.as_tensor(t).reshape(-1).tolist()]
    lab_list = [int(v) for v in torch.as_tensor(labels).reshape(-1).tolist()]
    n = x_t.shape[0]
    if tuple(x_t.shape[1:]) != config.image_shape or len(t_list) != n or len(lab_list) != n:
        raise ValueError(f"x_t has shape {tuple(x_t.shape)}, t {len(t_list)} entries and labels {len(lab_list)}: "
                         f"expected [p, *{config.image_shape}] and p entries each")
    bad = [c for c in lab_list if not 0 <= c < config.n_classes]
    if bad:
        raise ValueError(f"labels={bad[:3]}: expected classes in [0, {config.n_classes - 1}]")
    p = next(model.parameters())
    abar = alphas_cumprod(config).to(device=p.device, dtype=p.dtype)
    t_idx = torch.tensor(t_list, device=p.device) - 1
    lab = torch.tensor(lab_list, device=p.device)
    shape = config.image_shape

    def single(x: Tensor, ti: Tensor, c: Tensor, a: Tensor) -> Tensor:
        e = model(x.reshape(1, *shape), ti.reshape(1), class_labels=c.reshape(1)).sample.reshape(-1)
        if target == "epsilon":
            return e
        d = x - (1 - a).sqrt() * e
        return d if target == "denoiser" else d / a.sqrt()

    flat = x_t.reshape(n, -1).to(device=p.device, dtype=p.dtype)
    d = flat.shape[1]
    max_rows = max(1, 2**17 // d) if max_rows is None else max_rows
    a = abar[t_idx]
    if n * d <= max_rows:  # small images: every probe and every row in one call
        return vmap(jacrev(single, argnums=0))(flat, t_idx, lab, a).detach()
    # large images: one forward pass per probe, then its rows J^T e_i, max_rows at a time
    eye = torch.eye(d, device=p.device, dtype=p.dtype)
    out = []
    for i in range(n):
        _, vjp_fn = vjp(lambda x: single(x, t_idx[i], lab[i], a[i]), flat[i])
        rows = vmap(lambda u: vjp_fn(u)[0])
        out.append(torch.cat([rows(eye[j:j + max_rows]).detach() for j in range(0, d, max_rows)]))
    return torch.stack(out)


def make_probe_points(x0: Float[Tensor, "p c h w"], labels: Int[Tensor, " p"], timesteps: Sequence[int],
                      config: DDPMConfig, seed: int) -> tuple[Float[Tensor, "q c h w"], list[int], list[int]]:
    """Every clean probe image noised at every timestep with fixed noise: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) z.

    Returns ``(x_t, t, labels)`` ordered timestep-major (all images at ``timesteps[0]`` first); the same
    ``seed`` gives the same points, so spectra of different models are taken at identical inputs.
    """
    if x0.dim() != 4 or tuple(x0.shape[1:]) != config.image_shape or labels.shape != (x0.shape[0],):
        raise ValueError(f"x0 has shape {tuple(x0.shape)} and labels {tuple(labels.shape)}: expected "
                         f"[p, *{config.image_shape}] and [p]")
    ts = [check_timestep(config, int(t), "probe_timesteps") for t in timesteps]
    if not ts:
        raise ValueError("probe_timesteps is empty: expected at least one timestep in [1, T]")
    abar = alphas_cumprod(config).to(torch.float64)
    gen = torch.Generator().manual_seed(int(seed))
    noise = torch.randn((len(ts), *x0.shape), generator=gen, dtype=torch.float64)
    pts = []
    for i, t in enumerate(ts):
        a = abar[t - 1]
        pts.append(a.sqrt() * x0.double() + (1 - a).sqrt() * noise[i])
    x_t = torch.cat(pts).to(x0.dtype)
    return x_t, [t for t in ts for _ in range(x0.shape[0])], [int(c) for _ in ts for c in labels.tolist()]
