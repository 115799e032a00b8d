"""Every lm-head GEMM of the chunked and eager paths, with one precision policy per device (DESIGN.md section 4).

- CUDA, bf16/fp16 inputs: the GEMMs run in the inputs' dtype on tensor cores with fp32 accumulation. The logits
  chunk comes out in fp32 straight from the GEMM (``torch.mm(..., out_dtype=torch.float32)``); the logit gradient
  goes back into the input dtype for the dX and dW GEMMs (fp16 scaled by a power of two per chunk, one host sync, so that
  small gradients do not flush to zero); dW is accumulated across chunks in fp32. Never an fp32 copy of the head.
- CPU (and fp32 inputs anywhere): fp32 GEMMs on one fp32 copy of the head per call, which measured fastest on the
  CPU (MKL has no fast bf16 GEMM on the CI machines) and is exact to fp32 rounding.

Memory per call: CPU fp32 ``V x H`` head copy (bf16/fp16 inputs only); GPU: the chunk's gradient in the input
dtype (``k x V``, 2 bytes per entry) next to the fp32 logits chunk. dW in fp32 costs ``4 V H`` bytes on either
device (the price of exact accumulation over chunks; rounding dW to bf16 after every chunk would lose the small
contributions of late chunks).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch

_TENSOR_CORE_DTYPES = (torch.bfloat16, torch.float16)
_FP16_GRAD_TARGET = 2.0 ** 14  # largest power of two a chunk's |dz| max is scaled to (fp16 max is 65504)


@dataclass(frozen=True)
class LogitTransform:
    """What a model does to its lm-head output before the softmax, in this order: multiply by ``scale``
    (Cohere's ``logit_scale``; Granite's ``1 / logits_scaling``), soft-cap ``c tanh(z / c)`` (Gemma 2's
    ``final_logit_softcapping``; None: off), divide by ``temperature`` (sampling / TRL's ``temperature``).

    Without a soft-cap, scale and temperature fold into the row kernels' one ``scale`` argument; with it, the
    chunk's logits are capped in place after the GEMM and the backward multiplies the logit gradient by
    ``scale (1 - tanh^2)`` (one more chunk-sized fp32 buffer).
    """

    temperature: float = 1.0
    scale: float = 1.0
    softcap: Optional[float] = None

    @property
    def row_scale(self) -> float:
        """The factor the row kernels apply to the chunk's logits."""
        return (1.0 if self.softcap else self.scale) / self.temperature

    def cap_(self, z: torch.Tensor) -> torch.Tensor:
        """In place: ``softcap * tanh(scale * z / softcap)`` (a no-op without a soft-cap)."""
        if self.softcap:
            z.mul_(self.scale / self.softcap).tanh_().mul_(self.softcap)
        return z

    def chain_(self, grad: torch.Tensor, capped: torch.Tensor) -> torch.Tensor:
        """In place: the gradient w.r.t. the capped logits ``capped`` taken back to the GEMM's output."""
        if self.softcap:
            grad.mul_(1.0 - (capped / self.softcap).square_()).mul_(self.scale)
        return grad

    def materialised(self, logits: torch.Tensor) -> torch.Tensor:
        """The whole transform on materialised logits, differentiably (the torch reference)."""
        z = logits * self.scale
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z / self.temperature


IDENTITY = LogitTransform()


def matched_operands(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """``(hidden, weight, bias)`` in one dtype, cast differentiably (gradients flow back in each one's dtype).

    Under ``torch.autocast`` on the inputs' device the lm-head runs in the autocast dtype, as ``F.linear`` would
    (a bf16 copy of an fp32 head per call, as autocast makes); otherwise mixed dtypes (e.g. bf16 hidden states of a
    mixed-precision model with an fp32 head) are promoted to the widest of them. float64 inputs are never cast.
    """
    dtypes = {t.dtype for t in (hidden, weight, bias) if t is not None}
    if torch.float64 in dtypes and len(dtypes) == 1:
        return hidden, weight, bias
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type) and torch.float64 not in dtypes:
        dtype = torch.get_autocast_dtype(device_type)
    elif len(dtypes) == 1:
        return hidden, weight, bias
    else:
        dtype = functools.reduce(torch.promote_types, dtypes)
    cast = lambda t: t if t is None or t.dtype == dtype else t.to(dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(bias)


def gemm_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the lm-head GEMMs run in for ``weight``: its own on a GPU for bf16/fp16, fp32 otherwise."""
    if weight.is_cuda and weight.dtype in _TENSOR_CORE_DTYPES:
        return weight.dtype
    return torch.float32


class LmHeadGemms:
    """The GEMMs of one call over one lm-head ``weight`` [V, H] (+ ``bias`` [V]), detached from autograd.

    ``logits(x, out)``: ``out[k, V] = x @ W.T + b`` in fp32; ``grad_operand(dz)``: the logit gradient ``dz``
    [k, V] (fp32) as the dX / dW GEMMs take it; ``grad_hidden(g)``: [k, H] fp32 ``dz @ W``;
    ``accumulate_grad_weight(dw, g, x)``: ``dw[V, H] + dz.T @ x`` in fp32.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], transform: LogitTransform = IDENTITY) -> None:
        self.transform = transform
        self.dtype = gemm_dtype(weight)
        self.weight = weight.detach().to(self.dtype)
        self.bias = None if bias is None else bias.detach().to(torch.float32)

    def operand(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach().to(self.dtype)

    def logits(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out[k, V]``: the chunk's logits in fp32, soft-capped when the transform says so (the row kernels
        apply ``transform.row_scale``)."""
        with no_autocast(out):
            return self.transform.cap_(self._logits(x, out))

    def _logits(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.dtype == torch.float32:
            torch.mm(self.operand(x), self.weight.t(), out=out)
        else:
            torch.mm(self.operand(x), self.weight.t(), out_dtype=torch.float32, out=out)
        if self.bias is not None:
            out.add_(self.bias)
        return out

    def grad_operand(self, dz: torch.Tensor) -> "GradOperand":
        if self.dtype == torch.float32:
            return GradOperand(dz, None)
        if self.dtype == torch.float16:
            # a power-of-two scale (one host sync per chunk, fp16 only); dividing it out again is exact
            peak = max(float(dz.abs().amax()), torch.finfo(torch.float32).tiny)
            scale = 2.0 ** math.floor(math.log2(_FP16_GRAD_TARGET / peak))
            return GradOperand((dz * scale).to(self.dtype), scale)
        return GradOperand(dz.to(self.dtype), None)

    def grad_hidden(self, g: "GradOperand", out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[k, H] fp32 ``dz @ W`` (into ``out`` when given)."""
        with no_autocast(g.value):
            return self._grad_hidden(g, out)

    def _grad_hidden(self, g: "GradOperand", out: Optional[torch.Tensor]) -> torch.Tensor:
        if self.dtype == torch.float32:
            dx = torch.mm(g.value, self.weight, out=out) if out is not None else torch.mm(g.value, self.weight)
        elif out is not None:
            dx = torch.mm(g.value, self.weight, out_dtype=torch.float32, out=out)
        else:
            dx = torch.mm(g.value, self.weight, out_dtype=torch.float32)
        return dx if g.scale is None else dx.mul_(1.0 / g.scale)

    def accumulate_grad_weight(self, dw: torch.Tensor, g: "GradOperand", x: torch.Tensor) -> torch.Tensor:
        """``dw + dz.T @ x`` in fp32: ``dw`` itself updated on the fp32 path, a new tensor on the tensor-core path
        (cuBLAS's mixed-dtype ``addmm`` writes a new fp32 result; the old one is freed at once, so the peak is
        two fp32 dW for the length of one GEMM)."""
        with no_autocast(dw):
            return self._accumulate_grad_weight(dw, g, x)

    def _accumulate_grad_weight(self, dw: torch.Tensor, g: "GradOperand", x: torch.Tensor) -> torch.Tensor:
        if self.dtype == torch.float32:
            return dw.addmm_(g.value.t(), self.operand(x))
        alpha = 1.0 if g.scale is None else 1.0 / g.scale
        return torch.addmm(dw, g.value.t(), self.operand(x), out_dtype=torch.float32, alpha=alpha)

    @staticmethod
    def grad_bias(dz: torch.Tensor) -> torch.Tensor:
        return dz.sum(dim=0)


def no_autocast(t: torch.Tensor):
    """The GEMMs here pick their own dtypes: an enclosing ``torch.autocast`` must not recast them."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()


class GradOperand:
    """The logit gradient in the GEMM dtype, and the power-of-two scale it carries (fp16 only, else None)."""

    __slots__ = ("value", "scale")

    def __init__(self, value: torch.Tensor, scale: Optional[float]) -> None:
        self.value, self.scale = value, scale


__all__ = ["IDENTITY", "LmHeadGemms", "LogitTransform", "GradOperand", "gemm_dtype", "matched_operands"]
