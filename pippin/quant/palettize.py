"""k-means palettization: each group of G output rows of a weight shares a lookup table of 2**b values.

The LUT is fitted by 1-D k-means over the group's weights, weighted by the sensitivity of each input
channel (the second moment of its activations on calibration text, llama.cpp's imatrix / the GPTQ
Hessian diagonal; SqueezeLLM and coremltools' SKM use the same idea with Fisher weights). Weights are
then replaced by the index of their nearest LUT entry. Vectorised over all groups of a matrix with
batched searchsorted + scatter_add, so a 135M-parameter model palettizes in seconds.
Follows coremltools' `per_grouped_channel` granularity (axis 0, group_size 16, as AFM).

`error_feedback` then re-chooses the indices with GPTQ's column-by-column error feedback, the LUTs held
fixed (as GPTVQ does for 1-D codebooks): rounding each weight to its nearest LUT entry minimises the
weight error, but what matters is the layer's output error on real inputs, E||(W - W_hat) x||^2, and
pushing each column's rounding error onto the columns not yet chosen (through the inverse of the input
second moment H = E[x x^T]) lowers it a lot at 2 and 3 bits.

With row scales, each row is stored as an fp16 scale times unit-RMS values looked up in the shared LUT: the rows of a
group differ in norm (a rotation of the input leaves each row's norm unchanged), and a LUT shared by 16 of them
otherwise spends its entries on the largest. The scale costs 16 bits per row (0.03 bits per weight at 576 columns);
error feedback refits it to the chosen indices by least squares against H.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(kw_only=True)
class Palette:
    """A palettized weight: indices into per-group LUTs."""

    idx: torch.Tensor
    """(N, K) int64 index of each weight's LUT entry."""
    lut: torch.Tensor
    """(N / group_size, 2**bits) fp16 LUT values, sorted ascending."""
    bits: int
    group_size: int
    row_scale: torch.Tensor | None = None
    """(N,) fp16 scale of each row (the LUTs then hold unit-RMS rows), or None."""

    def dequantize(self) -> torch.Tensor:
        """The (N, K) fp32 weight this palette stands for."""
        return self.unscaled() if self.row_scale is None else self.unscaled() * self.row_scale.float()[:, None]

    def unscaled(self) -> torch.Tensor:
        """The (N, K) fp32 LUT values, before row scales."""
        lut = self.lut.float().repeat_interleave(self.group_size, dim=0)  # (N, 2**b)
        return lut.gather(1, self.idx)


def fit_palette(
    w: torch.Tensor,
    *,
    bits: int,
    group_size: int = 16,
    importance: torch.Tensor | None = None,
    iters: int = 15,
    row_scale: bool = False,
) -> Palette:
    """Weighted k-means per group of `group_size` rows. `importance` (K,) weights input channels. With `row_scale`
    the rows are normalised to unit RMS first, and each value is weighted by its row's squared scale as well (its
    error in the stored weight is the scale times its error in the LUT)."""
    N, K = w.shape
    if N % group_size:
        raise ValueError(f"{N} rows are not a multiple of group_size {group_size}")
    n = 2**bits
    G = N // group_size
    w = w.detach().float()
    scale = None
    if row_scale:
        scale = w.pow(2).mean(1).sqrt().clamp_min(1e-8).half()
        w = w / scale.float()[:, None]
    v = w.reshape(G, group_size * K)
    imp = torch.ones(K) if importance is None else importance.float().clamp_min(1e-8 * float(importance.max().clamp_min(1e-30)))
    rows = torch.ones(N) if scale is None else scale.float().pow(2)
    a = (rows[:, None] * imp[None, :]).reshape(G, group_size * K)
    # Initialise with quantiles of each group's values (where the mass is) plus a quarter of the entries
    # evenly across [min, max], so outlier weights, which matter most in LLMs, get entries of their own;
    # quantiles alone leave them lumped with the bulk and Lloyd's iterations pull them back only slowly.
    sorted_v = v.sort(dim=1).values
    n_span = n // 4
    pos = ((torch.arange(n - n_span) + 0.5) / (n - n_span) * v.shape[1]).long()
    lo, hi = sorted_v[:, :1], sorted_v[:, -1:]
    span = lo + (hi - lo) * torch.linspace(0, 1, n_span).unsqueeze(0) if n_span else sorted_v[:, :0]
    c = torch.cat([sorted_v[:, pos], span], dim=1).sort(dim=1).values.contiguous()
    for _ in range(iters):
        idx = _assign(v, c)
        num = torch.zeros(G, n).scatter_add_(1, idx, a * v)
        den = torch.zeros(G, n).scatter_add_(1, idx, a)
        c = torch.where(den > 0, num / den.clamp_min(1e-30), c).sort(dim=1).values.contiguous()
    c = c.half().float().sort(dim=1).values.contiguous()  # store in fp16; assign against the stored values
    idx = _assign(v, c)
    return Palette(idx=idx.reshape(N, K), lut=c.half(), bits=bits, group_size=group_size, row_scale=scale)


def _assign(v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Nearest centroid for every value: centroids are sorted, so it is a search among midpoints."""
    mids = ((c[:, 1:] + c[:, :-1]) / 2).contiguous()
    return torch.searchsorted(mids, v.contiguous())


@torch.no_grad()
def error_feedback(w: torch.Tensor, palette: Palette, H: torch.Tensor, *, damping: float = 0.01, block: int = 32) -> Palette:
    """GPTQ with the palette's LUTs held fixed: new indices that lower the output error tr((W - W_hat) H (W - W_hat)^T).

    Columns go in order of decreasing H diagonal (GPTQ's act-order), in blocks of `block` with lazy updates;
    `damping` times the mean diagonal is added to H so that directions the calibration text never excites stay
    well-posed. `H` is (K, K), any float dtype. Returns a new Palette with the same LUTs; row scales, if any, are
    held fixed while the indices are chosen (on the normalised rows), then refitted: s = <u, w>_H / <u, u>_H for each
    row's LUT values u."""
    N, K = w.shape
    if H.shape != (K, K):
        raise ValueError(f"H is {tuple(H.shape)}, expected ({K}, {K}) for a weight of {tuple(w.shape)}")
    H0, H = H, H.double().clone()
    d = H.diagonal()
    d[d <= 0] = 1.0  # inputs that are always zero: their weights do not matter
    perm = torch.argsort(d, descending=True)
    H = H[perm][:, perm]
    H.diagonal().add_(damping * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    scale = None if palette.row_scale is None else palette.row_scale.float()
    w = w.detach().float() if scale is None else w.detach().float() / scale[:, None]
    Wt = w.t()[perm].contiguous()  # (K, N): a column of W is a contiguous row here
    lut = palette.lut.float().repeat_interleave(palette.group_size, dim=0)  # (N, 2**b) sorted rows
    mids = ((lut[:, 1:] + lut[:, :-1]) / 2).contiguous()
    idx = torch.empty(K, N, dtype=torch.long)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        Eb = torch.empty(i2 - i1, N)
        for j in range(i1, i2):
            ij = torch.searchsorted(mids, Wt[j].unsqueeze(1))  # (N, 1): nearest entry of each row's LUT
            idx[j] = ij[:, 0]
            e = Eb[j - i1]
            torch.sub(Wt[j], lut.gather(1, ij)[:, 0], out=e).div_(U[j, j])
            Wt[j + 1 : i2].addr_(U[j, j + 1 : i2], e, alpha=-1)
        Wt[i2:] -= U[i1:i2, i2:].t() @ Eb
    out = Palette(idx=idx.t()[:, torch.argsort(perm)].contiguous(), lut=palette.lut, bits=palette.bits, group_size=palette.group_size)
    if scale is not None:
        u, Hd = out.unscaled().double(), H0.double()
        uH = u @ Hd
        fit = (uH * (w.double() * scale.double()[:, None])).sum(1) / (uH * u).sum(1).clamp_min(1e-30)
        out.row_scale = torch.where(fit > 0, fit, scale.double()).half()  # a row of zeros keeps its RMS scale
    return out


def output_error(w: torch.Tensor, palette: Palette, H: torch.Tensor) -> torch.Tensor:
    """(N,) per-row output error (W - W_hat) H (W - W_hat)^T of a palette: E||(W - W_hat) x||^2 row by row."""
    dw = (palette.dequantize() - w.detach().float()).double()
    return ((dw @ H.double()) * dw).sum(1)
