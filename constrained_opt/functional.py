"""Pure math of constrained multi-objective updates on flat gradient vectors.

Every function here is stateless and sync-free: inputs and outputs are tensors on the caller's
device, and nothing reads a value back to the host. The optimizer calls these functions and nothing
else for the math, so the tests of this module are the tests of the optimizer's projection.

Notation: ``r = ∇L_r`` (retain gradient); ``F`` the matrix whose rows are the constraint gradients
``f_i = ∇g_i``, i = 1..m (one row ``f`` for m = 1). The Gram of the m + 1 rows, constraints first and
retain last, is ``[[FFᵀ, Fr], [rᵀFᵀ, r·r]]``; :class:`Gram` holds its blocks ``gg = FFᵀ``,
``rr = r·r``, ``gr = Fr`` (0-dim tensors for m = 1, exactly as the closed form of Theorem 3.1 uses them).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .errors import SettingError

_HALF = (torch.float16, torch.bfloat16)
# Columns per pass of gram_rows when two rows are promoted to fp32 (2 x 4M x 4 B = 32 MiB), so the
# accumulation is wide without a full-size copy; k rows promoted to b bytes take 8 * _PASS / (k * b) columns.
_PASS = 1 << 22
# Columns per block of the blocked CPU Gram: the rows of a block (k x 64K x 4 B) stay in L2 while their
# products are formed, so the buffer is read from memory once.
_BLOCK = 1 << 16
# Below this many columns (64 MiB of fp32 rows) a pair of rows fits a server's L3 cache and three dots
# are faster; above it the blocked pass is. Measured on 2 EPYC cores with 32 MiB of L3 (docs/benchmarks.md).
# With more than two rows the blocked pass is used at every size (k(k+1)/2 dots re-read the rows; one
# (k, n) GEMM was 1.3-12x a memcpy of the rows against 2-4.8x for the blocked pass at 0.7M columns).
_BLOCKED_MIN_COLUMNS = 1 << 23
# Exact enumeration of the dual QP visits all 2^m active sets.
MAX_CONSTRAINTS = 8


class Gram:
    """The (m+1)×(m+1) Gram of the constraint gradients F (rows ∇g_i) and the retain gradient r,
    constraint rows first, retain row last: ``[[FFᵀ, Fr], [rᵀFᵀ, r·r]]``.

    It has one form, the matrix; ``gg = FFᵀ``, ``rr = r·r`` and ``gr = Fr`` are views into it (0-dim for
    m = 1: f·f, r·r, f·r, exactly as the closed form of Theorem 3.1 uses them). ``Gram(gg, rr, gr)``
    assembles the matrix from its blocks; :meth:`of` wraps a matrix without a copy. Unpacks as
    ``gg, rr, gr = gram``.
    """

    __slots__ = ("_matrix", "gg", "gr", "rr")

    def __init__(self, gg: Tensor, rr: Tensor, gr: Tensor) -> None:
        m = 1 if gg.dim() == 0 else gg.shape[-1]
        top = torch.cat([gg.reshape(m, m), gr.reshape(m, 1)], 1)
        matrix = torch.cat([top, torch.cat([gr.reshape(1, m), rr.reshape(1, 1)], 1)], 0)
        self._set(matrix, vector_blocks=gg.dim() == 2)

    @classmethod
    def of(cls, matrix: Tensor, vector_blocks: bool = False) -> Gram:
        """The Gram whose matrix is ``matrix`` (shared, not copied). One constraint gets 0-dim blocks
        unless ``vector_blocks`` ([1, 1] and [1], as for a ``[1, n]`` constraint matrix)."""
        g = cls.__new__(cls)
        g._set(matrix, vector_blocks)
        return g

    def _set(self, matrix: Tensor, vector_blocks: bool) -> None:
        k = matrix.shape[0] - 1
        self._matrix = matrix
        if k == 1 and not vector_blocks:
            self.gg, self.rr, self.gr = matrix[0, 0], matrix[1, 1], matrix[0, 1]
        else:
            self.gg, self.rr, self.gr = matrix[:k, :k], matrix[k, k], matrix[:k, k]

    def __iter__(self):
        return iter((self.gg, self.rr, self.gr))

    def __add__(self, other: Gram) -> Gram:
        return Gram.of(self._matrix + other._matrix, vector_blocks=self.gg.dim() == 2)

    def __repr__(self) -> str:
        return f"Gram(gg={self.gg}, rr={self.rr}, gr={self.gr})"

    @property
    def m(self) -> int:
        """Number of constraints."""
        return self._matrix.shape[0] - 1

    def constraint_sq_norms(self) -> Tensor:
        """‖∇g_i‖²: ``gg`` itself for m = 1, its diagonal otherwise."""
        return self.gg if self.gg.dim() == 0 else self.gg.diagonal(dim1=-2, dim2=-1)

    def matrix(self) -> Tensor:
        """The (m+1)×(m+1) Gram, constraint rows first, retain row last (the stored tensor itself)."""
        return self._matrix


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dots(f: Tensor, r: Tensor) -> Tensor:
    """[[f·f, f·r], [f·r, r·r]] from three BLAS dots."""
    gr = f @ r
    return torch.stack([f @ f, gr, gr, r @ r]).view(2, 2)


def _blocked_gram(rows: Tensor) -> Tensor:
    """``rows @ rows.T`` for a (k, n) CPU tensor as one batched GEMM over column blocks,
    Σ_b (k, c)·(c, k), summed over the blocks.

    For two rows, three BLAS dots read them four times (f·f, r·r, then f·r) and one (2, n)·(n, 2) GEMM
    packs panels; on 2 CPU cores at 35.7M fp32 elements the dots took 0.95x a memcpy of the buffer, the
    GEMM 2.8x, this 0.73x. Summing per-block products is also more accurate than one long fp32 dot:
    1e-6 relative error against fp64 at 4M elements, 3e-5 for sdot (5e-4 at 35.7M).
    """
    k, n = rows.shape
    full = n - n % _BLOCK
    tail = rows[:, full:]
    out = tail @ tail.T
    if full:
        blocks = rows[:, :full].reshape(k, -1, _BLOCK).transpose(0, 1)
        out = out + torch.bmm(blocks, blocks.transpose(1, 2)).sum(0)
    return out


def gram_rows(rows: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Return ``rows @ rows.T`` for a ``(k, n)`` tensor, k ≥ 1, accumulated in ``dtype`` (default: fp32,
    or fp64 for fp64 rows).

    Two rows: three BLAS dots, except for large buffers on CPU: a cache-blocked batched GEMM there (one
    read of the buffer). More rows: the blocked pass on CPU, one GEMM on other devices (device
    reductions are bandwidth-bound already). Rows narrower than ``dtype`` are promoted one pass of
    columns at a time (``dtype=torch.float64`` gives a Gram whose entries cannot overflow or underflow
    for any finite fp32/bf16/fp16 rows).
    """
    if rows.dim() != 2 or rows.shape[0] < 1:
        raise SettingError(f"gram_rows expects a (k, n) tensor with k >= 1, got shape {tuple(rows.shape)}")
    k, n = rows.shape
    acc = dtype or accumulation_dtype(rows.dtype)
    cpu = rows.device.type == "cpu"
    blocked = cpu and (k > 2 or n >= _BLOCKED_MIN_COLUMNS)
    if k == 2 and not blocked and rows.dtype == acc:
        return _dots(rows[0], rows[1])
    if rows.dtype == acc:
        return _blocked_gram(rows) if blocked else rows @ rows.T
    out = torch.zeros(k, k, dtype=acc, device=rows.device)
    step = max(1, _PASS * 8 // (k * torch.finfo(acc).bits // 8))
    for start in range(0, n, step):
        chunk = rows[:, start : start + step].to(acc)
        if blocked:
            out += _blocked_gram(chunk)
        else:
            out += _dots(chunk[0], chunk[1]) if k == 2 else chunk @ chunk.T
    return out


def gram(constraint_grad: Tensor, retain_grad: Tensor, dtype: torch.dtype | None = None) -> Gram:
    """Inner products of the constraint gradient(s) and the retain gradient, accumulated in fp32 (fp64
    for fp64, or ``dtype``). ``constraint_grad``: a flat vector (0-dim blocks) or an ``[m, n]`` matrix."""
    c = constraint_grad if constraint_grad.dim() == 2 else constraint_grad.reshape(1, -1)
    r = retain_grad.reshape(-1)
    if c.shape[1] != r.shape[0]:
        raise SettingError(
            f"gradient shapes differ: constraint {tuple(constraint_grad.shape)} vs "
            f"retain {tuple(retain_grad.shape)}; both must be flat vectors over the same parameters"
        )
    acc = dtype or accumulation_dtype(torch.promote_types(constraint_grad.dtype, retain_grad.dtype))
    m = gram_rows(torch.cat([c.to(acc), r.to(acc)[None]]))
    return Gram.of(m, vector_blocks=constraint_grad.dim() == 2)


def gram_from_matrix(m: Tensor) -> Gram:
    """The :class:`Gram` of the (m+1)×(m+1) matrix of :func:`gram_rows` (constraint rows first, retain
    row last), without a copy; a 2×2 matrix gives the 0-dim blocks of the single-constraint closed form."""
    return Gram.of(m)


class KKTSolution(NamedTuple):
    """λ of δ = r + Fᵀλ, and each target's shortfall (a_i − ∇g_i·δ)₊: all zero when the targets are
    jointly feasible, the least violation otherwise."""

    lam: Tensor
    shortfall: Tensor


def kkt_solve(a: Tensor | float, g: Gram | Tensor) -> KKTSolution:
    """Solve  min_δ ½‖r − δ‖²  s.t.  ∇g_i·δ ≥ a_i  (i = 1..m) from the Gram alone.

    m = 1 (0-dim blocks): Theorem 3.1's closed form λ = max(0, (a − f·r)/‖f‖²), and λ = 0 (δ = r)
    when ‖f‖² = 0, where the constraint cannot be moved by δ.

    m ≥ 2: δ = r + Σ λ_i ∇g_i with λ ≥ 0 minimising the dual ½λᵀ(FFᵀ)λ − λᵀ(a − Fr), solved exactly
    (:func:`dual_qp`). Dependent rows give the unique δ with one valid λ; a zero row gets λ_i = 0; when
    no δ meets every target, δ is the projection of r onto the targets lowered by the least violation
    (in units of each constraint's own gradient norm), reported as ``shortfall``. ``g`` may also be the
    full (m+1)×(m+1) Gram matrix.
    """
    if isinstance(g, Tensor):
        g = gram_from_matrix(g)
    a = torch.as_tensor(a, dtype=g.gg.dtype, device=g.gg.device)
    if g.gg.dim() == 0:
        positive = g.gg > 0
        safe_gg = torch.where(positive, g.gg, torch.ones_like(g.gg))
        lam = torch.clamp_min((a - g.gr) / safe_gg, 0.0)
        lam = torch.where(positive, lam, torch.zeros_like(lam))
        return KKTSolution(lam, torch.where(positive, torch.zeros_like(a), torch.clamp_min(a, 0.0)))
    return dual_qp(g.gg, g.gr, a.expand(g.gr.shape))


def kkt_multiplier(a: Tensor | float, g: Gram | Tensor) -> Tensor:
    """λ of :func:`kkt_solve`: λ = max(0, (a − f·r)/‖f‖²) for one constraint (Theorem 3.1), the
    non-negative dual solution ``[m]`` for m constraints."""
    return kkt_solve(a, g).lam


def kkt_direction(retain_grad: Tensor, constraint_grad: Tensor, a: Tensor | float) -> tuple[Tensor, Tensor]:
    """Return ``(δ, λ)`` with δ = r + Fᵀλ, the solution of

        min_δ ½‖r − δ‖²   s.t.   ∇g_i·δ ≥ a_i,

    for a flat ``constraint_grad`` (one constraint, λ 0-dim) or an ``[m, n]`` one (λ ``[m]``, ``a`` a
    scalar or ``[m]``). Works on any float dtype and device; δ has the dtype of ``retain_grad`` and λ
    the accumulation dtype (fp32, or fp64 for fp64 inputs).

    Fp32/bf16/fp16 inputs whose fp32 Gram leaves the fp32 range (entries beyond ~1e19 overflow their
    squares, entries below ~1e-23 underflow them) are solved from an fp64 Gram instead, so any finite
    input gives the right direction as long as λ itself is representable; so are m constraints whose
    fp32 solve reports a shortfall (rows within fp32's dependence threshold, sin θ ≤ ε^¼ ≈ 1.07°, solve
    as dependent). Both Grams are formed, and the choice is made on the device (no sync): the fp32
    result, bit-identical to the closed form, is kept wherever it is in range and attains its targets.
    """
    if not (retain_grad.is_floating_point() and constraint_grad.is_floating_point()):
        raise TypeError(
            f"kkt_direction needs floating-point gradients, got {retain_grad.dtype} and "
            f"{constraint_grad.dtype}"
        )
    if constraint_grad.dim() == 2 and constraint_grad.shape[0] > MAX_CONSTRAINTS:
        raise SettingError(too_many_constraints(constraint_grad.shape[0]))
    g = gram(constraint_grad, retain_grad)
    lam, shortfall = kkt_solve(a, g)
    if g.gg.dtype != torch.float64:
        wide = gram(constraint_grad, retain_grad, torch.float64)
        lam_wide = kkt_multiplier(torch.as_tensor(a, dtype=torch.float64, device=g.gg.device), wide)
        trusted = gram_in_range(g) & (shortfall == 0).all()
        lam = torch.where(trusted, lam, lam_wide.to(lam.dtype))
    rows = constraint_grad.to(retain_grad.dtype)
    if rows.dim() == 2:
        delta = retain_grad + (lam.to(retain_grad.dtype)[:, None] * rows).sum(0)
    else:
        delta = retain_grad + lam.to(retain_grad.dtype) * rows
    return delta, lam


def gram_in_range(g: Gram | Tensor) -> Tensor:
    """True when every entry of the Gram is finite and no diagonal entry is below the fp range where
    squares lose precision (tiny/eps: ~1e-31 in fp32), so a fp32 Gram can be trusted; a 0-dim bool."""
    m = g.matrix() if isinstance(g, Gram) else g
    info = torch.finfo(m.dtype)
    return torch.isfinite(m).all() & (m.diagonal() >= info.tiny / info.eps).all()


def too_many_constraints(m: int) -> str:
    return (
        f"{m} constraints in one projection; the exact dual solver enumerates all 2^m active sets and "
        f"supports at most {MAX_CONSTRAINTS}: pool related constraints into one loss, or project per "
        "param group"
    )


def _subset_masks(m: int, device: torch.device) -> Tensor:
    """All 2^m subsets of {0..m-1} as a [2^m, m] bool tensor (row p: the bits of p)."""
    p = torch.arange(1 << m, device=device)
    return ((p[:, None] >> torch.arange(m, device=device)) & 1).bool()


def _sweep(a: Tensor, allowed: Tensor, tol: float) -> tuple[Tensor, Tensor]:
    """Beaton's sweep of symmetric matrices ``a`` [P, m, m] on pivots 0..m-1 in order, where ``allowed``
    [P, m] and the current pivot exceeds ``tol``. Returns the swept matrices and the swept mask.

    After sweeping the set B (with U the rest): a_BB = −A_BB⁻¹, a_BU = A_BB⁻¹A_BU, a_UU = the Schur
    complement A_UU − A_UB A_BB⁻¹ A_BU. A pivot of a unit-diagonal Gram is the squared sine of the angle
    between that row and the span of the rows swept before it, so a pivot ≤ ``tol`` marks a row that
    is (numerically) a combination of them: it is left unswept.
    """
    swept = torch.zeros_like(allowed)
    for k in range(a.shape[-1]):
        d = a[:, k, k]
        do = allowed[:, k] & (d > tol)
        inv = 1.0 / torch.where(do, d, torch.ones_like(d))
        col = a[:, :, k] * inv[:, None]
        row = a[:, k, :]
        b = a - col[:, :, None] * row[:, None, :]
        b[:, :, k] = col
        b[:, k, :] = row * inv[:, None]
        b[:, k, k] = -inv
        a = torch.where(do[:, None, None], b, a)
        swept[:, k] = do
    return a, swept


def dual_qp(gg: Tensor, gr: Tensor, a: Tensor) -> KKTSolution:
    """Exact solution of the m-constraint projection from its Gram; ``gr`` and ``a`` may carry leading
    batch dimensions (problems sharing one ``gg``).

    Rows are normalised (f̂_i = f_i/‖f_i‖, â_i = a_i/‖f_i‖; zero rows are set aside with λ_i = 0 and
    shortfall max(a_i, 0)). Then, for every active set S of linearly independent rows, batched over all
    2^m sets with Beaton's sweep:

    1. Least violation. s* = Π_K(â), the projection of the targets onto K = {z ≥ 0 : F̂ᵀz = 0}, the
       cone of Farkas certificates (s* = 0 iff the targets are feasible; Moreau: â − s* is then the
       closest attainable target vector). For each support T, z_T is the projection of â_T onto
       null(F̂_Tᵀ); with F̂_D = CᵀF̂_B (B the independent rows of T, D the dependent ones, C = Ĝ_BB⁻¹Ĝ_BD)
       that is z_D = (I + CᵀC)⁻¹(â_D − Cᵀâ_B), z_B = −Cz_D. s* is the non-negative candidate of
       largest norm.
    2. The projection with targets â − s*: λ̂_S = Ĝ_SS⁻¹(b̂_S − s*_S), b̂ = â − F̂r, kept if λ̂ ≥ 0 and
       every other constraint holds; the candidate with the smallest violation of these conditions is
       the KKT point (any of them gives the same δ when rows are dependent).
    3. Polish: a row that δ still misses by more than the rounding of Ĝλ̂ − b̂ (a row within the
       threshold of the span of others, so not exactly on it) has its shortfall raised to the miss, so
       δ = r + F̂ᵀλ̂ is exactly the projection of r onto the targets a − s that are reported.

    Everything is done in fp64 on the device, sync-free. A pivot (squared sine of the angle between a
    row and the span of the rows before it) below tol = √ε of ``gg``'s dtype marks a dependent row, and
    shortfalls below 1e-3·tol of the scale max(|â_i|, |b̂_i|) count as 0 (the rounding of the data); a
    set S counts as independent only if the smallest eigenvalue of Ĝ_SS also exceeds tol/2 (checked by
    a Cholesky of Ĝ_SS − tol/2·I, since the sweep's later pivots carry the rounding of the earlier
    ones), and a Farkas candidate only if ‖F̂ᵀz‖² ≤ m·tol·‖z‖².
    """
    m = gg.shape[-1]
    if m > MAX_CONSTRAINTS + 1:  # the multi-objective rules solve it over all m + 1 rows
        raise SettingError(too_many_constraints(m))
    out_dtype, device = gg.dtype, gg.device
    wide = torch.float64 if device.type != "mps" else torch.float32
    tol_pivot = math.sqrt(torch.finfo(out_dtype).eps)
    batch = torch.broadcast_shapes(gr.shape, a.shape)[:-1]
    gg, gr, a = gg.to(wide), gr.to(wide).expand(*batch, m).reshape(-1, m), a.to(wide)
    a = a.expand(*batch, m).reshape(-1, m)
    sq = gg.diagonal()
    nonzero = sq > 0
    d = torch.sqrt(torch.where(nonzero, sq, torch.ones_like(sq)))
    outer = nonzero[:, None] & nonzero[None, :]
    eye = torch.eye(m, dtype=wide, device=device)
    g_hat = torch.where(outer, gg / (d[:, None] * d[None, :]), eye)
    a_hat = torch.where(nonzero, a / d, torch.zeros_like(a))
    b_hat = torch.where(nonzero, (a - gr) / d, torch.zeros_like(a))

    subsets = _subset_masks(m, device) & nonzero  # zero rows are never active
    unique = (_subset_masks(m, device) == subsets).all(-1)  # drop the duplicates this creates
    swept_g, swept = _sweep(g_hat.expand(len(subsets), m, m).clone(), subsets, tol_pivot)
    dependent = subsets & ~swept
    # The sweep's pivots carry the rounding of the pivots before them, so an independent set is also
    # checked from Ĝ itself: its smallest eigenvalue exceeds tol/2 (1 − cos θ for two rows at angle θ
    # to (anti)parallel, whose pivot is sin²θ ≈ 2(1 − cos θ)), i.e. Ĝ_SS − (tol/2)I is positive definite.
    on = subsets[:, :, None] & subsets[:, None, :]
    shifted = torch.where(on, g_hat - 0.5 * tol_pivot * eye, eye)
    conditioned = torch.linalg.cholesky_ex(shifted)[1] == 0
    scale = torch.maximum(a_hat.abs().amax(-1), b_hat.abs().amax(-1))  # [batch]
    tol = (1e3 * torch.finfo(out_dtype).eps * m) * scale

    # 1. least violation s* = Π_K(â)
    c = swept_g * (swept[:, :, None] & dependent[:, None, :])  # [P, m, m], nonzero on B x D only
    h = eye + c.transpose(1, 2) @ c
    rhs = (a_hat[:, None, :] - (a_hat[:, None, None, :] @ c).squeeze(-2)) * dependent  # [batch, P, m]
    t = torch.linalg.solve_ex(h, rhs.unsqueeze(-1))[0].squeeze(-1) * dependent
    z = t - (c @ t.unsqueeze(-1)).squeeze(-1)
    # a candidate is a Farkas certificate only if F̂ᵀz ≈ 0, checked on Ĝ: ‖F̂ᵀz‖² = zᵀĜz ≤ m·tol·‖z‖²
    # (a dependent row is within tol of the span of B); an ill-conditioned B fails it
    certificate = ((z @ g_hat) * z).sum(-1) <= m * tol_pivot * (z * z).sum(-1)
    ok = (z >= -tol[:, None, None]).all(-1) & unique & certificate
    best = torch.where(ok, (z * z).sum(-1), torch.full_like(ok, -1.0, dtype=wide)).argmax(-1)
    s_hat = z[torch.arange(len(best), device=device), best]  # [batch, m]
    s_hat = torch.where(s_hat > tol[:, None], s_hat, torch.zeros_like(s_hat))

    # 2. projection onto the attainable targets â − s*
    target = b_hat - s_hat
    independent = (~dependent.any(-1)) & unique & conditioned
    inv = -swept_g * on  # Ĝ_SS⁻¹, zero elsewhere
    lam_hat = (inv @ target[:, None, :, None]).squeeze(-1)  # [batch, P, m]
    slack = (lam_hat @ g_hat) - target[:, None, :]  # Ĝλ̂ − b̂': ≥ 0 off S, 0 on S
    off = ~subsets & nonzero
    violation = torch.maximum(
        torch.clamp_min(-lam_hat, 0.0).amax(-1), torch.clamp_min(-slack * off, 0.0).amax(-1)
    )
    violation = torch.where(independent, violation, torch.full_like(violation, math.inf))
    choice = violation.argmin(-1)
    rows = torch.arange(len(choice), device=device)
    lam_hat = torch.clamp_min(lam_hat[rows, choice], 0.0)
    # one step of iterative refinement on the chosen set: Ĝ_SS⁻¹ from the sweep carries an error ~ε·κ,
    # which a nearly singular (but independent) Ĝ_SS turns into a residual above rounding
    chosen = subsets[choice]  # [batch, m]
    residual = (target - lam_hat @ g_hat) * chosen
    lam_hat = torch.clamp_min(lam_hat + (inv[choice] @ residual.unsqueeze(-1)).squeeze(-1) * chosen, 0.0)

    # 3. polish: a row that δ still misses (a dependent row, which lies within tol of the span of the
    # active rows, not on it) has its target lowered to what δ attains, so δ = r + F̂ᵀλ̂ is exactly the
    # projection onto â − ŝ (λ̂ ≥ 0, the active rows met with equality, the others with slack ≥ 0).
    # Misses within the rounding of Ĝλ̂ − b̂' (relative to the magnitudes summed) are not shortfalls.
    product = lam_hat[:, None, :] * g_hat  # [batch, m, m]
    miss = torch.clamp_min(target - product.sum(-1), 0.0) * nonzero
    rounding = (64 * torch.finfo(out_dtype).eps * (m + 1)) * (
        scale[:, None] + target.abs() + product.abs().sum(-1)
    )
    s_hat = s_hat + torch.where(miss > rounding, miss, torch.zeros_like(miss))
    # A shortfall below 1e-3·√ε of the problem's scale is the rounding of its data (targets met exactly
    # by opposite rows, say), not a conflict: it is reported as 0, so `infeasible` is not raised.
    s_hat = torch.where(s_hat > (1e-3 * tol_pivot) * scale[:, None], s_hat, torch.zeros_like(s_hat))
    lam = torch.where(nonzero, lam_hat / d, torch.zeros_like(lam_hat))
    shortfall = torch.where(nonzero, s_hat * d, torch.clamp_min(a, 0.0))
    return KKTSolution(lam.reshape(*batch, m).to(out_dtype), shortfall.reshape(*batch, m).to(out_dtype))


class DirectionProducts(NamedTuple):
    """δ·r, δ·f and ‖δ‖² for δ = c_r r + c_f f (``dot_constraint`` is ``[m]`` for m constraints).
    Sums over disjoint coordinate blocks add up."""

    dot_retain: Tensor
    dot_constraint: Tensor
    sq_norm: Tensor

    def __add__(self, other: DirectionProducts) -> DirectionProducts:  # type: ignore[override]
        return DirectionProducts(
            self.dot_retain + other.dot_retain,
            self.dot_constraint + other.dot_constraint,
            self.sq_norm + other.sq_norm,
        )


def direction_products(g: Gram, retain_coef: Tensor, constraint_coef: Tensor) -> DirectionProducts:
    """δ·r = c_r rr + c_f gr,  δ·f = c_r gr + c_f gg,  ‖δ‖² = c_r² rr + 2 c_r c_f gr + c_f² gg
    (with c_f a vector, Fδ = c_r Fr + FFᵀc_f and ‖δ‖² = c_r² rr + 2c_r c_fᵀFr + c_fᵀFFᵀc_f).

    Derived from the Gram alone: no pass over the vectors.
    """
    if g.gg.dim() == 0:
        return DirectionProducts(
            retain_coef * g.rr + constraint_coef * g.gr,
            retain_coef * g.gr + constraint_coef * g.gg,
            torch.clamp_min(
                retain_coef**2 * g.rr + 2 * retain_coef * constraint_coef * g.gr + constraint_coef**2 * g.gg,
                0.0,
            ),
        )
    dot_constraint = retain_coef * g.gr + g.gg @ constraint_coef
    return DirectionProducts(
        retain_coef * g.rr + constraint_coef @ g.gr,
        dot_constraint,
        torch.clamp_min(
            retain_coef * (retain_coef * g.rr + constraint_coef @ g.gr) + constraint_coef @ dot_constraint,
            0.0,
        ),
    )


def safe_cosine(dot: Tensor, sq_norm_a: Tensor, sq_norm_b: Tensor) -> Tensor:
    """dot / (‖a‖‖b‖), and 0 when either vector is zero."""
    denom = torch.sqrt(sq_norm_a) * torch.sqrt(sq_norm_b)
    positive = denom > 0
    return torch.where(positive, dot / torch.where(positive, denom, torch.ones_like(denom)), 0.0)


def clip_scale(products: DirectionProducts, max_norm: float | None) -> Tensor:
    """s = min(1, max_norm / ‖δ‖): scaling (c_r, c_f) by s clips δ to ‖δ‖ ≤ max_norm for free."""
    if max_norm is None:
        return torch.ones_like(products.sq_norm)
    return norm_clip_scale(products.sq_norm, max_norm)


# ------------------------------------------------ the adversaries' steps (constrained_opt.robust)
def sharpness_scale(sq_norm: Tensor, rho: float) -> Tensor:
    """ρ/‖g‖ from ‖g‖² (0 when g = 0): θ + (ρ/‖g‖)·g is SAM's worst-case point θ + ρ·g/‖g‖."""
    norm = torch.sqrt(sq_norm)
    positive = norm > 0
    return torch.where(positive, rho / torch.where(positive, norm, torch.ones_like(norm)), 0.0)


def norm_clip_scale(sq_norm: Tensor, max_norm: float) -> Tensor:
    """min(1, c/‖g‖) from ‖g‖²: g scaled by it has norm ≤ c (a relearning attacker's gradient clip)."""
    norm = torch.sqrt(sq_norm)
    return torch.clamp_max(max_norm / torch.clamp_min(norm, torch.finfo(norm.dtype).tiny), 1.0)


def steepest_ascent(grad: Tensor, norm: float) -> Tensor:
    """The unit-norm direction u maximising g·u: g/‖g‖₂ for ``norm=2`` (0 when g = 0), sign(g) for
    ``norm=math.inf``."""
    if norm == math.inf:
        return torch.sign(grad)
    length = torch.linalg.vector_norm(grad.double()).to(grad.dtype)
    return torch.where(length > 0, grad / torch.where(length > 0, length, torch.ones_like(length)), 0.0)


def ball_projection(x: Tensor, center: Tensor, eps: float | None, norm: float) -> Tensor:
    """The point of {y : ‖y − center‖ ≤ ε} nearest to x in ``norm`` (2 or inf); x itself for ε None:
    center + (x − center)·min(1, ε/‖x − center‖₂), or center + clamp(x − center, −ε, ε)."""
    if eps is None:
        return x
    d = x - center
    if norm == math.inf:
        return center + d.clamp(-eps, eps)
    length = torch.linalg.vector_norm(d.double())
    scale = torch.clamp_max(eps / torch.clamp_min(length, torch.finfo(torch.float64).tiny), 1.0)
    return center + d * scale.to(d.dtype)
