"""NOLA's A and B: the pure function of the coefficients, and the per-layer cache that computes it once per step.

    A = A0 + Σᵢ αᵢ·Uᵢ/√k_A  (r × in),   B = Σⱼ βⱼ·Vⱼ/√k_B  (out × r)

Why a cache: a training step runs a layer's forward once per micro-batch, again in every gradient-checkpointing
recompute, and in eval and generation, while the coefficients change only at the optimizer step. Regenerating k
bases for each of those is the cost that made NOLA slower than LoRA. `MaterializedMatrices` keys A and B by the
coefficient values themselves (a copy of a few thousand floats, compared exactly), not by a version counter: an
engine that swaps parameter storage (DeepSpeed ZeRO-3 gathers), a loaded state dict or an optimizer step all change
the values and so the key, and nothing else can.

Backward, two ways:
- per micro-batch (the default): `reused_combination` projects ∂L/∂A onto the basis in every backward, so `.grad`
  is complete when `backward()` returns, as any training loop or engine expects.
- deferred (opt-in, `deferred = True`; the trainer turns it on): forward hands out A and B as leaf tensors whose
  gradients accumulate over the micro-batches, and `take_deferred` projects the sum once, right before the
  optimizer step: one backward basis pass per step instead of one per micro-batch. Exact up to float rounding,
  because the projection is linear.
"""

from __future__ import annotations

import functools
import math

import torch

from nola.autograd import basis_combination, reused_combination
from nola.basis import STREAM_A, STREAM_A0, STREAM_B, STREAM_VERA_A, STREAM_VERA_B, generate_basis
from nola.fused import project


def initial_a(seed: int, rank: int, in_features: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The frozen A0 (r × in): uniform in ±1/√in, the bound of kaiming_uniform_(a=√5) that LoRA uses."""
    unit = generate_basis(seed, STREAM_A0, 0, 1, rank * in_features, device).view(rank, in_features)
    return unit.to(dtype) * (1.0 / math.sqrt(in_features))


def vera_bound(fan_in: int) -> float:
    """√3·√2/√fan_in = √6/√fan_in: the bound of PEFT's `_kaiming_init` (kaiming-uniform with the ReLU gain √2, not
    LoRA's a = √5), which draws VeRA's projections. Written in PEFT's order of operations so the float is the same."""
    return math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(fan_in))


@functools.lru_cache(maxsize=64)
def vera_projection(seed: int, stream: int, rank: int, features: int, fan_in: int, dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
    """The first `features` columns of one of VeRA's shared frozen projections (r × its full width), uniform in
    ±`vera_bound(fan_in)`, `fan_in` being the full shared matrix's: A (stream STREAM_VERA_A), or Bᵀ (STREAM_VERA_B).

    Why the full matrix's fan_in and a slice: VeRA (PEFT) draws one pair for the largest layer and every layer
    computes with its top-left slice, so all layers share one bound. Row i of the seeded basis is a prefix-stable
    vector, so the first columns of row i are that slice whatever the full width. Cached and keyed by the run seed,
    not a module's: one tensor per distinct width serves all layers of that width, made outside inference mode so
    that training may save it for backward."""
    with torch.inference_mode(False), torch.no_grad():
        return generate_basis(seed, stream, 0, rank, features, device).to(dtype) * vera_bound(fan_in)


def vera_matrices(lambda_d: torch.Tensor, lambda_b: torch.Tensor, seed: int, in_features: int, out_features: int,
                  shared_in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VeRA's update as a LoRA pair: ΔW = Λ_b·B·Λ_d·A = (Λ_b·B)·(Λ_d·A), so A' = d ⊙ rows of A (r × in) and
    B' = b ⊙ rows of B (out × r); differentiable in the scaling vectors d (r) and b (out), which alone train.

    A and B are the top-left slices of the shared pair, A_s (r × `shared_in_features`, the widest adapted layer's
    in) and B_s (widest out × r), whose fan_in are `shared_in_features` and r, as PEFT's `_kaiming_init` sees them."""
    rank = lambda_d.numel()
    a = vera_projection(seed, STREAM_VERA_A, rank, in_features, shared_in_features, lambda_d.dtype, lambda_d.device)
    b_t = vera_projection(seed, STREAM_VERA_B, rank, out_features, rank, lambda_d.dtype, lambda_d.device)
    return lambda_d[:, None] * a, lambda_b[:, None] * b_t.t()


def basis_scale(coefficients: torch.Tensor) -> float:
    """1/√k: the basis term's scale. One definition, because the cached forward (`nola_matrices`) and both
    backward paths (`reused_combination`, `take_deferred`) must agree on it or the gradients are silently wrong."""
    return 1.0 / math.sqrt(coefficients.numel())


def nola_matrices(
    alphas: torch.Tensor, betas: torch.Tensor, seed: int, rank: int, in_features: int, out_features: int,
    chunk_bytes: int, a0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r × in) and B (out × r): a pure function of the coefficients and the module's seed and shape, so merge
    and export compute the very matrices training used without a model. `a0`: `initial_a`, when already at hand."""
    alphas = alphas * basis_scale(alphas)
    betas = betas * basis_scale(betas)
    if a0 is None:
        a0 = initial_a(seed, rank, in_features, alphas.dtype, alphas.device)
    a = a0 + basis_combination(alphas, seed, STREAM_A, a0.numel(), chunk_bytes).view_as(a0)
    b = basis_combination(betas, seed, STREAM_B, out_features * rank, chunk_bytes)
    return a, b.view(out_features, rank)


def _same_values(cached: torch.Tensor, current: torch.Tensor) -> bool:
    return (cached.device == current.device and cached.dtype == current.dtype and cached.shape == current.shape
            and torch.equal(cached, current))


def _usable_here(tensor: torch.Tensor) -> bool:
    """Whether a cached tensor may serve the current mode. One made under `torch.inference_mode()` is an inference
    tensor: outside that mode autograd cannot record through it (a custom Function given one as input silently
    returns a result without grad_fn) nor may it be updated in place, so outside inference mode it is a cache miss.
    Tensors made in normal mode serve inference mode as they are."""
    return torch.is_inference_mode_enabled() or not tensor.is_inference()


class MaterializedMatrices:
    """One adapted layer's A and B for the coefficient values last seen, and (deferred mode) their gradients."""

    def __init__(self, seed: int, rank: int, in_features: int, out_features: int, chunk_bytes: int) -> None:
        self.seed, self.rank, self.in_features, self.out_features = seed, rank, in_features, out_features
        self.chunk_bytes = chunk_bytes
        self.deferred = False
        self._key: tuple[torch.Tensor, torch.Tensor] | None = None
        self._values: tuple[torch.Tensor, torch.Tensor] | None = None
        self._leaves: tuple[torch.Tensor, torch.Tensor] | None = None  # deferred: what forward handed out
        self._coefficients: tuple[torch.Tensor, torch.Tensor] | None = None  # deferred: graph back to parameters
        self._a0: torch.Tensor | None = None  # frozen: generated once, not at every step

    def matrices(self, alphas: torch.Tensor, betas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) for these coefficients; differentiable in them whenever autograd is recording."""
        self._refresh(alphas.detach(), betas.detach())
        a, b = self._values
        if not (torch.is_grad_enabled() and (alphas.requires_grad or betas.requires_grad)):
            return a, b
        if self.deferred:
            if self._leaves is None:
                self._leaves = (a.detach().requires_grad_(), b.detach().requires_grad_())
            self._coefficients = (alphas, betas)
            return self._leaves
        return (reused_combination(alphas, a, self.seed, STREAM_A, basis_scale(alphas), self.chunk_bytes),
                reused_combination(betas, b, self.seed, STREAM_B, basis_scale(betas), self.chunk_bytes))

    def take_deferred(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(coefficients as the forward used them, ∂L/∂ those) from the gradients accumulated on A and B since the
        last call, which are cleared. The caller runs one `torch.autograd.backward` over all layers' pairs, which
        carries them through quantisation into the parameters' `.grad`."""
        if self._leaves is None or self._coefficients is None:
            return []
        pairs = []
        for leaf, values, stream in zip(self._leaves, self._coefficients, (STREAM_A, STREAM_B)):
            if leaf.grad is not None and values.requires_grad:
                gradient = project(leaf.grad, self.seed, stream, values.numel(), self.chunk_bytes)
                pairs.append((values, gradient * basis_scale(values)))
            leaf.grad = None
        self._coefficients = None
        return pairs

    def discard_deferred(self) -> None:
        """Drop gradients accumulated on A and B (a skipped step)."""
        for leaf in self._leaves or ():
            leaf.grad = None
        self._coefficients = None

    def _refresh(self, alphas: torch.Tensor, betas: torch.Tensor) -> None:
        if (self._key is not None and _same_values(self._key[0], alphas) and _same_values(self._key[1], betas)
                and all(_usable_here(tensor) for tensor in self._values)):
            return
        if self._leaves is not None and any(leaf.grad is not None for leaf in self._leaves):
            raise RuntimeError("nola: the coefficients changed while deferred gradients of A and B were waiting: call "
                               "nola.project_deferred_gradients(model) before optimizer.step()")
        if (self._a0 is None or self._a0.dtype != alphas.dtype or self._a0.device != alphas.device
                or not _usable_here(self._a0)):
            self._a0 = initial_a(self.seed, self.rank, self.in_features, alphas.dtype, alphas.device)
        with torch.no_grad(), torch.autocast(alphas.device.type, enabled=False):
            a, b = nola_matrices(alphas, betas, self.seed, self.rank, self.in_features, self.out_features,
                                 self.chunk_bytes, self._a0)
        self._key, self._values = (alphas.clone(), betas.clone()), (a, b)
        self._leaves = self._coefficients = None
