"""Seeded random projections of per-example gradients for the gradient-similarity chapter (03).

Two projections, both unbiased for inner products (``E[<Px, Py>] = <x, y>``), so that projected cosines
and dot products estimate the exact ones (Johnson-Lindenstrauss):

* :class:`BlockedProjector` maps a flat gradient of dimension ``d`` to ``k`` with ``P / sqrt(k)``, where
  ``P`` is a ``d x k`` Rademacher (+-1) or standard Gaussian matrix that is never materialised whole: it
  is generated tile by tile (``row_block x col_block``), each tile from its own generator seeded with a
  function of the projector's seed and the tile's position. The matrix therefore depends only on the
  seed, the shape, the kind and the device type that draws it (CPU and CUDA generators differ), never
  on the data, the batch or the partition being processed. With a single row tile, column tile ``c`` is
  drawn exactly as TRAK's ``BasicProjector`` draws its block ``c`` (generator seeded with
  ``seed + 1000 c``, a ``d x col_block`` Bernoulli(1/2) draw mapped to +-1, or a Gaussian draw), so the
  two agree up to the ``1/sqrt(k)`` scale (Park et al., 2023; checked in the tests).
* :class:`FactoredProjector` projects the gradient of a linear layer, ``G = sum_t g_t a_t^T``
  (``out x in``), with the Kronecker product of two small matrices, ``vec(P_out G P_in^T)``, computed
  as ``sum_t (P_out g_t)(P_in a_t)^T`` from the layer's output gradients and inputs, so that neither
  ``G`` nor the ``(k_out k_in) x (out in)`` matrix exists (the LoGra construction of Choe et al., 2024).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from imprint.runtime.checks import require_choice, require_int

ProjectionKind = Literal["rademacher", "gaussian"]
KINDS = ("rademacher", "gaussian")
# Tile seeds: seed + COLUMN_STRIDE * c + ROW_STRIDE * r. COLUMN_STRIDE is TRAK's; ROW_STRIDE is a prime
# larger than COLUMN_STRIDE * MAX_COLUMN_TILES, so no two tiles of one projector share a seed.
COLUMN_STRIDE = 1000
ROW_STRIDE = 1_000_003
MAX_COLUMN_TILES = 1000


def derive_seed(seed: int, *labels: object) -> int:
    """A 62-bit seed determined by ``seed`` and ``labels`` (e.g. a module name), stable across runs."""
    require_int("seed", seed, minimum=0)
    digest = hashlib.sha256(repr((int(seed), *map(str, labels))).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


def random_tile(seed: int, rows: int, cols: int, kind: ProjectionKind, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> Float[Tensor, "rows cols"]:
    """A ``rows x cols`` tile of +-1 (Bernoulli(1/2) mapped to +-1) or N(0, 1) entries from its own generator."""
    generator = torch.Generator(device=device).manual_seed(int(seed))
    tile = torch.empty(rows, cols, device=device, dtype=dtype)
    if kind == "rademacher":
        tile.bernoulli_(0.5, generator=generator)
        tile.mul_(2.0).sub_(1.0)
    else:
        tile.normal_(generator=generator)
    return tile


@dataclass(frozen=True)
class BlockedProjector:
    """``x -> x P / sqrt(k)`` for a ``d x k`` random ``P`` drawn tile by tile (see the module docstring).

    ``row_block x col_block`` bounds the memory of one tile. Use one row tile (``row_block >= dim``) to
    reproduce TRAK's ``BasicProjector`` with ``block_size = col_block``.
    """

    dim: int
    proj_dim: int
    seed: int
    kind: ProjectionKind = "rademacher"
    row_block: int = 1 << 16
    col_block: int = 256

    def __post_init__(self):
        require_int("dim", self.dim, minimum=1)
        if isinstance(self.proj_dim, bool) or not isinstance(self.proj_dim, int) or self.proj_dim <= 0:
            raise ValueError(f"proj_dim={self.proj_dim!r}: expected a projection dimension >= 1")
        require_int("seed", self.seed, minimum=0)
        require_choice("kind", self.kind, KINDS)
        require_int("row_block", self.row_block, minimum=1)
        require_int("col_block", self.col_block, minimum=1)
        if math.ceil(self.proj_dim / self.col_block) > MAX_COLUMN_TILES:
            raise ValueError(f"col_block={self.col_block}: proj_dim={self.proj_dim} needs more than "
                             f"{MAX_COLUMN_TILES} column tiles; use a larger col_block")

    @property
    def n_row_tiles(self) -> int:
        return math.ceil(self.dim / self.row_block)

    @property
    def n_col_tiles(self) -> int:
        return math.ceil(self.proj_dim / self.col_block)

    def tile_seed(self, row_tile: int, col_tile: int) -> int:
        return self.seed + COLUMN_STRIDE * col_tile + ROW_STRIDE * row_tile

    def tile(self, row_tile: int, col_tile: int, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> Float[Tensor, "rows cols"]:
        """Tile ``(row_tile, col_tile)`` of the unscaled ``P`` (a full ``col_block`` wide, as TRAK draws it)."""
        rows = min(self.row_block, self.dim - row_tile * self.row_block)
        return random_tile(self.tile_seed(row_tile, col_tile), rows, self.col_block, self.kind, device, dtype)

    def project(self, x: Float[Tensor, "n dim"]) -> Float[Tensor, "n proj_dim"]:
        """``x P / sqrt(k)``, accumulated over tiles in ``x``'s dtype (float32 at least)."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x has shape {tuple(x.shape)}: expected (n, {self.dim})")
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        x = x.to(dtype)
        out = torch.zeros(x.shape[0], self.proj_dim, device=x.device, dtype=dtype)
        for r in range(self.n_row_tiles):
            rows = slice(r * self.row_block, min((r + 1) * self.row_block, self.dim))
            x_rows = x[:, rows]
            for c in range(self.n_col_tiles):
                cols = slice(c * self.col_block, min((c + 1) * self.col_block, self.proj_dim))
                tile = self.tile(r, c, x.device, dtype)
                out[:, cols] += x_rows @ tile[:, : cols.stop - cols.start]
        return out / math.sqrt(self.proj_dim)

    def matrix(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
               ) -> Float[Tensor, "dim proj_dim"]:
        """The scaled matrix ``P / sqrt(k)`` in full: for tests and small layers only."""
        rows = []
        for r in range(self.n_row_tiles):
            tiles = [self.tile(r, c, device, dtype) for c in range(self.n_col_tiles)]
            rows.append(torch.cat(tiles, dim=1)[:, : self.proj_dim])
        return torch.cat(rows, dim=0) / math.sqrt(self.proj_dim)


def factor_dims(proj_dim: int) -> tuple[int, int]:
    """``(k_out, k_in)`` with ``k_out * k_in = proj_dim`` and the two as close to ``sqrt(proj_dim)`` as possible."""
    if isinstance(proj_dim, bool) or not isinstance(proj_dim, int) or proj_dim <= 0:
        raise ValueError(f"proj_dim={proj_dim!r}: expected a projection dimension >= 1")
    k_in = max(d for d in range(1, math.isqrt(proj_dim) + 1) if proj_dim % d == 0)
    return proj_dim // k_in, k_in


@dataclass(frozen=True)
class FactoredProjector:
    """Kronecker projection ``vec(P_out G P_in^T)`` of a ``out x in`` weight gradient, ``P_out ⊗ P_in``.

    ``P_out`` (``k_out x out``) and ``P_in`` (``k_in x in``) are the transposed matrices of two
    :class:`BlockedProjector` s seeded from ``seed``; each is scaled by ``1/sqrt(k)`` so the Kronecker
    product preserves inner products in expectation. The result has ``k_out * k_in`` entries, flattened
    row-major (output index first), matching ``kron(P_out, P_in) @ vec(G)`` for a row-major ``vec``.
    """

    out_features: int
    in_features: int
    proj_dim: int
    seed: int
    kind: ProjectionKind = "rademacher"
    device: str = "cpu"
    p_out: Tensor = field(init=False, repr=False, compare=False)
    p_in: Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        require_int("out_features", self.out_features, minimum=1)
        require_int("in_features", self.in_features, minimum=1)
        k_out, k_in = factor_dims(self.proj_dim)
        # Tiles as wide as the factor: nothing is drawn beyond the k_out (k_in) columns kept.
        object.__setattr__(self, "p_out", BlockedProjector(self.out_features, k_out, derive_seed(self.seed, "out"),
                                                          self.kind, col_block=min(k_out, 256))
                           .matrix(self.device).T.contiguous())
        object.__setattr__(self, "p_in", BlockedProjector(self.in_features, k_in, derive_seed(self.seed, "in"),
                                                         self.kind, col_block=min(k_in, 256))
                           .matrix(self.device).T.contiguous())

    @property
    def k_out(self) -> int:
        return self.p_out.shape[0]

    @property
    def k_in(self) -> int:
        return self.p_in.shape[0]

    def project_factors(self, inputs: Float[Tensor, "batch seq in_features"],
                        output_grads: Float[Tensor, "batch seq out_features"]) -> Float[Tensor, "batch proj"]:
        """``sum_t (P_out g_t)(P_in a_t)^T`` per example, flattened: the projection of ``sum_t g_t a_t^T``."""
        dtype = torch.promote_types(inputs.dtype, torch.float32)
        a = inputs.to(dtype) @ self.p_in.to(dtype).T            # (batch, seq, k_in)
        g = output_grads.to(dtype) @ self.p_out.to(dtype).T     # (batch, seq, k_out)
        return torch.einsum("bto,bti->boi", g, a).reshape(inputs.shape[0], -1)

    def project_embedding(self, token_ids: Int[Tensor, "batch seq"],
                          output_grads: Float[Tensor, "batch seq out_features"]) -> Float[Tensor, "batch proj"]:
        """The projection of an embedding table's gradient ``sum_t e_{x_t} g_t^T`` (``vocab x hidden``).

        Here the table's rows (the vocabulary) are the output side and its columns the input side, as for a
        tied output head, so that both contributions to a tied weight use the same two matrices.
        """
        dtype = torch.promote_types(output_grads.dtype, torch.float32)
        rows = self.p_out.to(dtype)[:, token_ids].permute(1, 2, 0)   # (batch, seq, k_out)
        cols = output_grads.to(dtype) @ self.p_in.to(dtype).T        # (batch, seq, k_in)
        return torch.einsum("bto,bti->boi", rows, cols).reshape(token_ids.shape[0], -1)

    def project_gradient(self, grads: Float[Tensor, "batch out_features in_features"]) -> Float[Tensor, "batch proj"]:
        """``P_out G P_in^T`` of materialised gradients (the reference the factored path is tested against)."""
        dtype = torch.promote_types(grads.dtype, torch.float32)
        projected = self.p_out.to(dtype) @ grads.to(dtype) @ self.p_in.to(dtype).T
        return projected.reshape(grads.shape[0], -1)
