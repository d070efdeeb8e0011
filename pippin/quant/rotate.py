"""Incoherence processing: orthogonal rotations folded into the weights before quantization (QuaRot, SpinQuant R1/R2).

Every RMSNorm's weight is first folded into the linears that read it; the norm then commutes with any orthogonal map,
so the residual stream can live in a rotated basis (R1: the embedding's rows and every linear that reads or writes the
stream are rotated), and each value head in another (R2: v_proj's rows and o_proj's columns). The model computes the
same function, but outlier channels are spread over all channels, which is what a LUT per group of rows and 8-bit
activations need. The rotations are randomized Hadamard matrices (QuaRot): exact ±1 entries, so the same seed gives the
same weights on any machine. The tied head is the one place that pays at run time: the final norm's weight cannot be
folded into an embedding that is also the input, so `RotatedHead` maps the head's input back through
M = R^T diag(gamma) R, one dim x dim matmul per token (0.3 % of this model's decode work). down_proj's input
(silu(gate) * up) has nothing linear before it to fold a rotation into: R4 is applied online by the palettized layer
itself (`HadamardTransform`, `PalettizedLinear.in_signs`), which stores W R and rotates x with a fast transform.
Acts on Hugging Face module names (`layers.{i}.self_attn.q_proj`, ...); never imports the model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pippin.errors import PippinError
from pippin.kernels import ops


def _paley(q: int) -> torch.Tensor:
    """A Hadamard matrix of order q + 1 for a prime q = 3 mod 4 (Paley's first construction), float64 of ±1."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if i in residues else -1.0 for i in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jac = chi[(idx[None, :] - idx[:, None]) % q]  # Jacobsthal matrix Q[i, j] = chi(j - i)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jac
    return s + torch.eye(q + 1, dtype=torch.float64)


def hadamard_factors(n: int) -> tuple[torch.Tensor, int]:
    """(A, p) with hadamard(n) = kron(A, S_p): A the Paley part (12^b x 12^b, float64 ±1, kron of Paley blocks) and S_p
    the Sylvester matrix of order p = 2^a (kron of [[1, 1], [1, -1]]), which a fast Walsh-Hadamard transform applies."""
    a, m = torch.ones(1, 1, dtype=torch.float64), n
    while m % 12 == 0:
        a, m = torch.kron(a, _paley(11)), m // 12
    p = 1
    while m > 1 and m % 2 == 0:
        p, m = p * 2, m // 2
    if m != 1 or n < 1:
        raise PippinError(f"No Hadamard matrix of order {n} is built in (orders 2^a * 12^b are); this width cannot be rotated.")
    return a, p


def _sylvester(p: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.kron(h, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
    return h


def hadamard(n: int) -> torch.Tensor:
    """An n x n matrix of ±1 (float64) with H H^T = n I, for n = 2^a * 12^b (Sylvester and Paley blocks)."""
    a, p = hadamard_factors(n)
    return torch.kron(a, _sylvester(p))


def can_rotate(n: int) -> bool:
    """Whether `hadamard` builds order n."""
    try:
        hadamard_factors(n)
    except PippinError:
        return False
    return True


def random_signs(n: int, seed: int) -> torch.Tensor:
    """n random ±1 (int8), the same for the same seed everywhere."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n,), generator=g, dtype=torch.int8) * 2 - 1).to(torch.int8)


def rotation(signs: torch.Tensor) -> torch.Tensor:
    """The orthogonal R = diag(signs) H / sqrt(n) (float64); a row vector x goes to x R."""
    n = signs.numel()
    return signs.double()[:, None] * hadamard(n) / math.sqrt(n)


class HadamardTransform:
    """The online rotation x -> x R, R = rotation(signs), without building R (QuaRot's R4 on down_proj's input, where
    nothing linear comes before it to fold into). H = kron(A, S_p) (`hadamard_factors`), so with x viewed as an
    (m, p) matrix X, x H is A^T X S_p: an m x m mix of rows, then a fast Walsh-Hadamard transform of each row. The C++
    op (`hadamard_rows`, csrc/hadamard.cpp) runs the forward map for fp32 rows; PyTorch runs it factor by factor
    (small dense factors, differentiable) for gradients, other dtypes and the inverse x -> x R^T."""

    def __init__(self, signs: torch.Tensor) -> None:
        n = signs.numel()
        a, p = hadamard_factors(n)
        self.signs = signs.detach().float()
        """(n,) fp32 ±1."""
        negative = F.pad((self.signs < 0).to(torch.uint8), (0, -n % 8)).view(-1, 8)
        self.sign_bits = (negative << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8).contiguous()
        """(ceil(n / 8),) uint8, bit i % 8 of byte i // 8 set where signs[i] = -1: the kernels' form (192 bytes at
        n = 1536, read cold every decode step, where fp32 signs take 6 KB)."""
        self.block = (a / math.sqrt(n)).float().contiguous()
        """(m, m) fp32: the Paley part with 1/sqrt(n) folded in."""
        # S_p = kron(S_64, S_64, ..., S_rest): factors of at most 64 keep the PyTorch path's matrices small.
        self._factors, log_p = [a / math.sqrt(n)], p.bit_length() - 1
        while log_p > 0:
            self._factors.append(_sylvester(1 << min(6, log_p)))
            log_p -= min(6, log_p)

    def __call__(self, x: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
        """x R (rows), or x R^T with inverse (R^T = H^T diag(signs) / sqrt(n), H^T = kron(A^T, S_p))."""
        k = ops()
        if not inverse and k is not None and x.dtype == torch.float32 and not (x.requires_grad and torch.is_grad_enabled()):
            return k.hadamard_rows(x, self.sign_bits, self.block)
        mats = [f.to(x.dtype) for f in self._factors]
        if inverse:
            mats[0] = mats[0].T
        else:
            x = x * self.signs.to(x.dtype)
        y = x.unflatten(-1, [f.shape[0] for f in mats])
        for i, f in enumerate(mats):  # each factor along its own axis of the (m, p_1, p_2, ...) view
            axis = y.dim() - len(mats) + i
            y = (y.movedim(axis, -1) @ f).movedim(-1, axis)
        y = y.flatten(-len(mats))
        return y * self.signs.to(x.dtype) if inverse else y


R4_SEED_OFFSET = 100_000
"""Layer i's R4 signs use seed + R4_SEED_OFFSET + i: apart from R1 (seed) and R2 (seed + 1 + i) for any real depth."""


def rotates_down_input(name: str, in_features: int) -> bool:
    """Whether compression rotates this layer's input (R4): every down_proj whose width `hadamard` builds."""
    return name.rsplit(".", 1)[-1] == "down_proj" and can_rotate(in_features)


def down_input_signs(name: str, in_features: int, seed: int) -> torch.Tensor | None:
    """R4's signs for layer `name` (`layers.{i}.mlp.down_proj`), or None where `rotates_down_input` says no."""
    if not rotates_down_input(name, in_features):
        return None
    layer = int(name.split("layers.", 1)[1].split(".", 1)[0]) if "layers." in name else 0
    return random_signs(in_features, seed + R4_SEED_OFFSET + layer)


def hadamard_flops(n: int) -> int:
    """FLOPs of x -> x R for one row of width n = m p (a multiply-add is 2): the signs (n), the m x m mix (2 m n) and
    the Walsh-Hadamard transform (n log2 p)."""
    a, p = hadamard_factors(n)
    return n * (1 + 2 * a.shape[0] + p.bit_length() - 1)


def rotate_moment(h: torch.Tensor, transform: HadamardTransform) -> torch.Tensor:
    """R^T H R (float64) of a symmetric second moment H = E[x^T x]: the second moment of the rotated input x R."""
    hr = transform(h.double())  # H R, row by row
    return transform(hr.T.contiguous())  # (H R)^T R = R^T H R


class RotatedHead(nn.Module):
    """The head of a model whose residual stream is rotated: maps the (weightless) final norm's output back through
    M = R^T diag(gamma) R, then runs the tied head (which reads the rotated embedding) on it. Stores gamma, the signs
    that define R (M is rebuilt from them) and the seed of every rotation, so that another copy of the model (a
    full-precision teacher) can be rotated the same way (`rotate_like_`)."""

    def __init__(self, dim: int, head: nn.Module) -> None:
        super().__init__()
        self.head = head
        self.register_buffer("gamma", torch.ones(dim))
        self.register_buffer("signs", torch.ones(dim, dtype=torch.int8))
        self.register_buffer("seed", torch.zeros(1, dtype=torch.int64))
        self.register_buffer("mix", torch.eye(dim), persistent=False)

    def rebuild(self) -> None:
        """Recompute M from gamma and signs (after they are set or loaded)."""
        r = rotation(self.signs)
        self.mix = (r.T @ (self.gamma.double()[:, None] * r)).float()

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - nn.Module's hook signature
        super()._load_from_state_dict(*args, **kwargs)
        self.rebuild()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x @ self.mix)  # M is symmetric


def _fold_norm_(norm: nn.Module, readers: list[nn.Linear]) -> None:
    """W <- W diag(gamma) for each linear that reads the norm's output; the norm's weight becomes 1."""
    g = norm.weight.detach().double()
    for lin in readers:
        lin.weight.data = (lin.weight.detach().double() * g).to(lin.weight.dtype)
    norm.weight.data.fill_(1.0)


def _rotate_input_(lin: nn.Linear, r: torch.Tensor) -> None:
    """A linear that reads the rotated stream x R: W <- W R, so that (x R)(W R)^T = x W^T."""
    lin.weight.data = (lin.weight.detach().double() @ r).to(lin.weight.dtype)


def _rotate_output_(lin: nn.Linear, r: torch.Tensor) -> None:
    """A linear that writes into the rotated stream: W <- R^T W, so its output comes out as y R."""
    lin.weight.data = (r.T @ lin.weight.detach().double()).to(lin.weight.dtype)


@torch.no_grad()
def rotate_(model: nn.Module, *, seed: int = 0) -> RotatedHead:
    """Fold the norms and the rotations R1 (residual stream) and R2 (per value head) into `model`'s weights in place.

    The model must be unquantized, tied, without QK-norm, and its lm_head becomes a `RotatedHead`, which is returned.
    The function is unchanged up to float rounding (the folding runs in float64)."""
    cfg = model.config
    if not cfg.tie_embeddings or cfg.qk_norm:
        raise PippinError("Rotation needs a tied model without QK-norm (the head must read the embedding, and q/k are not rotated).")
    if not isinstance(model.embed_tokens, nn.Embedding):
        raise PippinError("Rotate before quantizing: the embedding is already compressed.")
    r1 = rotation(random_signs(cfg.dim, seed))
    emb = model.embed_tokens.weight
    emb.data = (emb.detach().double() @ r1).to(emb.dtype)
    for i, block in enumerate(model.layers):
        attn, mlp = block.self_attn, block.mlp
        linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        if not all(type(lin) is nn.Linear for lin in linears):
            raise PippinError(f"Rotate before quantizing or adding adapters: layer {i} has wrapped linears.")
        _fold_norm_(block.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
        _fold_norm_(block.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _rotate_input_(lin, r1)
        for lin in (attn.o_proj, mlp.down_proj):
            _rotate_output_(lin, r1)
        # R2: each value head's output v -> v R2, and o_proj's columns for every query head of that group undo it.
        r2 = rotation(random_signs(cfg.head_dim, seed + 1 + i))
        d = cfg.head_dim
        wv = attn.v_proj.weight.detach().double().view(cfg.n_kv_heads, d, -1)
        attn.v_proj.weight.data = torch.einsum("ed,hek->hdk", r2, wv).reshape_as(attn.v_proj.weight).to(attn.v_proj.weight.dtype)
        wo = attn.o_proj.weight.detach().double().view(-1, cfg.n_heads, d)
        attn.o_proj.weight.data = (wo @ r2).reshape_as(attn.o_proj.weight).to(attn.o_proj.weight.dtype)
    head = RotatedHead(cfg.dim, model.lm_head)
    head.gamma.copy_(model.norm.weight.detach())
    head.signs.copy_(random_signs(cfg.dim, seed))
    head.seed.fill_(seed)
    head.rebuild()
    model.norm.weight.data.fill_(1.0)
    model.lm_head = head
    return head


def rotate_like_(model: nn.Module, rotated: nn.Module) -> nn.Module:
    """Rotate the unquantized `model` in place as `rotated` was (its head records the seed), and return it: e.g. a
    full-precision teacher whose weights a recovery adapter on a rotated base is compared with, layer by layer."""
    head = rotated.lm_head
    if not isinstance(head, RotatedHead):
        raise PippinError("The reference model is not rotated; there is nothing to rotate like.")
    rotate_(model, seed=int(head.seed))
    if not torch.equal(model.lm_head.signs, head.signs):
        raise PippinError("Rotating with the recorded seed did not reproduce the model's rotation; was it rotated by another pippin?")
    return model
