"""``prefkern.sample``: seeded token sampling (temperature, top-k, top-p, min-p) for many rows at once."""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple, Union

import torch

from .. import reference
from .._validation import (
    FLOAT_DTYPES, INT64_MAX, INT64_MIN, check_float, check_index, check_integer, check_ndim, check_number,
    check_tensor,
)
from ..dispatch import resolve_backend
from ._backends import cuda_stream, dtype_code, native_module, triton_kernels

Number = Union[int, float]

# the smallest positive float32 temperature whose reciprocal is finite in float32
MIN_TEMPERATURE = 1.0 / torch.finfo(torch.float32).max


def _on_device(t: torch.Tensor):
    """Runs a launch under ``t``'s CUDA device (its stream and context), not the current one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@torch.library.custom_op("prefkern::sample", mutates_args=())
def sample_op(
    logits: torch.Tensor, row_index: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
    top_p: torch.Tensor, min_p: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor, backend: str,
    candidates: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Raw op: ``(tokens [R] int64, logprobs [R] float32)``; every per-row argument is a contiguous [R]
    tensor (temperature/top_p/min_p float32, top_k/seed/offset/row_index int64). A token of -1 marks a
    row with a NaN or +inf logit, without any finite logit, or whose ``logits / temperature`` overflows."""
    chosen = resolve_backend(backend, logits.device, "sample")
    if row_index.shape[0] == 0:
        return (torch.empty(0, dtype=torch.int64, device=logits.device),
                torch.empty(0, dtype=torch.float32, device=logits.device))
    return _launch_sample(chosen, logits, row_index, temperature, top_k, top_p, min_p, seed, offset, candidates)


def _launch_sample(
    chosen: str, logits: torch.Tensor, row_index: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
    top_p: torch.Tensor, min_p: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor, candidates: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The one backend ladder of ``sample_op`` (R >= 1 rows). ``candidates`` False: no row combines top-p
    with top-k or min-p, so the Triton kernel needs no per-row candidate scratch."""
    if chosen == "torch":
        rows = logits.index_select(0, row_index)
        x = rows.float()
        bad = _unusable_rows(x, temperature)
        safe = torch.where(bad.unsqueeze(-1), torch.zeros_like(x), x)
        tok, lp = reference.sample(safe, temperature, top_k, top_p, min_p, seed=seed, offset=offset,
                                   return_logprobs=True)
        lp = torch.where(temperature == 0, torch.zeros_like(lp), lp)
        return torch.where(bad, torch.full_like(tok, -1), tok), torch.where(bad, torch.zeros_like(lp), lp)
    with _on_device(logits):
        if chosen == "triton":
            return triton_kernels("sampling").sample(logits, row_index, temperature, top_k, top_p, min_p, seed,
                                                     offset, candidates=candidates)
        r, v = row_index.shape[0], logits.shape[1]
        tokens = torch.empty(r, dtype=torch.int64, device=logits.device)
        logprobs = torch.empty(r, dtype=torch.float32, device=logits.device)
        args = (logits.data_ptr(), dtype_code(logits), r, v, logits.stride(0), row_index.data_ptr(),
                temperature.data_ptr(), top_k.data_ptr(), top_p.data_ptr(), min_p.data_ptr(), seed.data_ptr(),
                offset.data_ptr(), tokens.data_ptr(), logprobs.data_ptr())
        if chosen == "native":
            native_module().sample_cpu(*args)
        else:
            native_module().sample_cuda(*args, cuda_stream(logits))
        return tokens, logprobs


@sample_op.register_fake
def _(logits, row_index, temperature, top_k, top_p, min_p, seed, offset, backend, candidates=True):
    r = row_index.shape[0]
    return logits.new_empty(r, dtype=torch.int64), logits.new_empty(r, dtype=torch.float32)


def _per_row(name: str, value, rows: int, device: torch.device, dtype: torch.dtype, integer: bool) -> torch.Tensor:
    """A contiguous [rows] tensor from one number (Python or NumPy; integers within int64) or a [rows]
    (or [1]) tensor."""
    if isinstance(value, torch.Tensor):
        if integer:
            check_index(name, value)
        elif not (value.is_floating_point() or value.dtype in (torch.int64, torch.int32)):
            raise TypeError(f"{name} must be a float tensor or a number, got dtype {value.dtype}")
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] not in (1, rows)):
            raise ValueError(f"{name} must be one number or a tensor of shape [R] = [{rows}], got {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but logits is on {device}")
        return value.to(dtype).reshape(-1).expand(rows).contiguous()
    try:
        number = check_number(name, value)
    except TypeError:
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}") from None
    except ValueError:  # NaN: the value checks below report it with the range
        number = float("nan")
    if integer:
        value = check_integer(name, value, low=INT64_MIN, high=INT64_MAX)
    elif name == "temperature" and 0 < number < MIN_TEMPERATURE:
        raise ValueError(_tiny_temperature(number))
    else:
        value = number
    return torch.full((rows,), value, dtype=dtype, device=device)


def _tiny_temperature(value: float) -> str:
    return (f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE:.4g}, got {value:.4g}: 1 / temperature "
            "overflows float32 (pass temperature=0 for greedy decoding)")


def _may_combine_top_p(top_k, top_p, min_p, vocab: int) -> bool:
    """Whether some row may filter by top-p after top-k or min-p, decided from the arguments alone
    (never from tensor values, so CUDA-graph safe): a tensor argument counts as "may"."""
    def used(v, off) -> bool:
        return isinstance(v, torch.Tensor) or (v is not None and off(v))

    return used(top_p, lambda p: float(p) < 1) and (
        used(top_k, lambda k: 0 < int(k) < vocab) or used(min_p, lambda m: float(m) > 0))


def _unusable_rows(x: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """[R] bool: rows the kernels give token -1: a NaN or +inf logit, no finite logit, or (sampled rows)
    a logit that ``* (1 / temperature)`` takes to +inf in float32."""
    bad = ~((x < float("inf")).all(dim=-1) & (x > -float("inf")).any(dim=-1))
    inv_t = torch.where(temperature > 0, 1.0 / temperature, torch.ones_like(temperature))
    return bad | ((x * inv_t.unsqueeze(-1)) == float("inf")).any(dim=-1)


def _torch_multinomial(logits, row_index, temp, k, tp, mp, generator):
    """The reference draw with ``torch.multinomial`` on ``generator`` (backend="torch", no seed)."""
    x = logits.index_select(0, row_index).float()
    bad = _unusable_rows(x, temp)
    safe = torch.where(bad.unsqueeze(-1), torch.zeros_like(x), x)
    tok, lp = reference.sample(safe, temp, k, tp, mp, generator=generator, return_logprobs=True)
    lp = torch.where((temp == 0) | bad, torch.zeros_like(lp), lp)
    return torch.where(bad, torch.full_like(tok, -1), tok), lp


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _check_values(temperature: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                  row_index: torch.Tensor, n_logit_rows: int) -> None:
    tiny = (temperature > 0) & (temperature < MIN_TEMPERATURE)
    checks = [
        ("temperature", ~(temperature >= 0) | (temperature == float("inf")), "finite numbers >= 0 (0 = greedy)"),
        ("temperature", tiny, f"0 (greedy) or >= {MIN_TEMPERATURE:.4g} (1 / temperature must be finite in float32)"),
        ("top_p", ~((top_p > 0) & (top_p <= 1)), "in (0, 1]"),
        ("min_p", ~((min_p >= 0) & (min_p <= 1)), "in [0, 1]"),
        ("row_index", (row_index < 0) | (row_index >= n_logit_rows), f"in [0, {n_logit_rows})"),
    ]
    flags = torch.stack([bad.any() for _, bad, _ in checks]).tolist()  # one host sync for all five
    for (name, bad, what), flag in zip(checks, flags):
        if flag:
            i = int(bad.nonzero()[0, 0])
            vals = {"temperature": temperature, "top_p": top_p, "min_p": min_p, "row_index": row_index}[name]
            raise ValueError(f"{name} must be {what}; {name}[{i}] = {vals[i].item()}")


def sample(
    logits: torch.Tensor,
    *,
    temperature: Union[Number, torch.Tensor] = 1.0,
    top_k: Union[int, torch.Tensor, None] = None,
    top_p: Union[Number, torch.Tensor, None] = None,
    min_p: Union[Number, torch.Tensor, None] = None,
    seed: Union[int, torch.Tensor, None] = None,
    offset: Union[int, torch.Tensor, None] = None,
    generator: Optional[torch.Generator] = None,
    row_index: Optional[torch.Tensor] = None,
    return_logprobs: bool = False,
    validate: Optional[bool] = None,
    backend: str = "auto",
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Draw one token per row from ``softmax(logits / temperature)`` filtered by top-k, top-p and min-p.

    Temperature-only rows are drawn by Gumbel-max in one read of the logits; filtered rows never sort
    the vocabulary (the kernels find each threshold by selection: quickselect on the CPU, a multi-pivot
    search on the value axis on the GPU) and then draw by Gumbel-max over the survivors. The filters
    follow vLLM's order and :func:`prefkern.reference.sampling_probs` defines them exactly: ``min_p``
    keeps ``p >= min_p * max p``, ``top_k`` keeps the ``k`` largest logits (ties at the boundary kept),
    ``top_p`` keeps the smallest set of most likely survivors whose renormalised mass reaches ``top_p``.

    Randomness is counter-based: output row ``r`` uses the stream of ``(seed[r], offset[r], r)``, one
    uniform per (row, column), the same integers on the native, CUDA, Triton and torch backends
    (:func:`prefkern.reference.sampling_uniforms`). The same seed therefore gives the same tokens on every
    backend, except where two Gumbel-perturbed scores (or a token's mass and a top-p / min-p boundary)
    are within float rounding of each other, because each backend computes ``log``/``exp`` and its sums
    with its own rounding; on one backend the tokens are always the same. Seeds and offsets passed as
    tensors make a call CUDA-graph safe (advance ``offset`` per step).

    Parameters
    ----------
    logits : [L, V] tensor, float32 / bfloat16 / float16; rows may be strided.
    temperature : number or [R] tensor, >= 0; 0 means greedy (the first maximum). A positive
        temperature below ``1 / float32 max`` (about 2.9e-39, where ``1 / temperature`` overflows float32)
        raises ValueError rather than silently becoming greedy; pass 0 for greedy decoding.
    top_k : int or [R] int tensor; ``None``, ``<= 0`` or ``>= V`` disables it. Numbers may be Python or
        NumPy scalars (``np.float32``, ``np.int64``), here and below.
    top_p : number or [R] tensor in (0, 1]; ``None`` or 1 disables it.
    min_p : number or [R] tensor in [0, 1]; ``None`` or 0 disables it.
    seed : int in the int64 range or [R] int64 tensor. ``None``: drawn from ``generator`` (or torch's
        default generator on the logits' device), one seed per call, without a host sync.
    offset : int in the int64 range or [R] int64 tensor (default 0): the position in the stream, e.g.
        the decoding step.
    generator : torch.Generator used when ``seed`` is ``None``; with ``backend="torch"`` and no seed the
        draw is ``torch.multinomial`` on this generator.
    row_index : [R] integer tensor, the logits row of each output row (default ``arange(L)``), so that
        n samples of one prompt read one row without a copy.
    return_logprobs : also return the log-prob of each token under the filtered, renormalised
        distribution it was drawn from (0 for greedy rows).
    validate : check argument values and NaN rows (one host sync). ``None``: on, except while a CUDA
        graph is being captured or ``torch.compile`` is tracing. Argument values of CPU tensors are
        always checked, except while ``torch.compile`` traces. Unchecked CUDA calls must pass
        ``row_index`` entries in ``[0, L)``.
    backend : ``"auto"`` (Triton on CUDA, native C++ on CPU), ``"native"``, ``"triton"``, ``"cuda"``, ``"torch"``.

    Returns
    -------
    tokens : [R] int64 tensor; and ``logprobs`` : [R] float32 tensor when ``return_logprobs``.
    Without validation a row with a NaN or +inf logit, with no finite logit, or whose logits divided by
    its temperature overflow float32, gives token -1.

    Raises
    ------
    TypeError for non-tensors or wrong dtypes; ValueError for wrong shapes or devices, parameter
    values out of range, or (when validating) rows with NaN / +inf logits or no finite logit.
    """
    check_tensor("logits", logits)
    check_float("logits", logits, FLOAT_DTYPES)
    check_ndim("logits", logits, 2, "[L, V]")
    n_rows, v = logits.shape
    dev = logits.device
    if row_index is None:
        row_index = torch.arange(n_rows, device=dev)
    else:
        check_tensor("row_index", row_index)
        check_index("row_index", row_index)
        check_ndim("row_index", row_index, 1, "[R]")
        if row_index.device != dev:
            raise ValueError(f"row_index is on {row_index.device} but logits is on {dev}")
        row_index = row_index.to(torch.int64).contiguous()
    r = row_index.shape[0]
    if v == 0 and r > 0:
        raise ValueError("logits must have a vocabulary dimension V > 0")
    if r > 0 and n_rows == 0:
        raise ValueError("row_index selects rows of logits, but logits has no rows")
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        logits = logits.contiguous()
    if v > 2**31 - 1:
        raise ValueError(f"V must be < 2^31, got {v}")
    temp = _per_row("temperature", temperature, r, dev, torch.float32, False)
    k = _per_row("top_k", 0 if top_k is None else top_k, r, dev, torch.int64, True)
    tp = _per_row("top_p", 1.0 if top_p is None else top_p, r, dev, torch.float32, False)
    mp = _per_row("min_p", 0.0 if min_p is None else min_p, r, dev, torch.float32, False)
    multinomial = backend == "torch" and generator is not None and seed is None
    if seed is None:
        gen_dev = generator.device if generator is not None else dev
        seed = torch.randint(0, 2**62, (1,), generator=generator, device=gen_dev).to(dev)
    sd = _per_row("seed", seed, r, dev, torch.int64, True)
    off = _per_row("offset", 0 if offset is None else offset, r, dev, torch.int64, True)
    tracing = torch.compiler.is_compiling()
    if validate is None:
        validate = not (_capturing(dev) or tracing)
    # on the CPU the check costs no sync: always on, except while torch.compile traces (no .tolist() there)
    if (validate or (dev.type == "cpu" and not tracing)) and r > 0:
        _check_values(temp, tp, mp, row_index, n_rows)
    logits = logits.detach()
    if multinomial:
        tokens, logprobs = _torch_multinomial(logits, row_index, temp, k, tp, mp, generator)
    else:
        tokens, logprobs = sample_op(logits, row_index, temp, k, tp, mp, sd, off, backend,
                                     _may_combine_top_p(top_k, top_p, min_p, v))
    if validate and r > 0 and bool((tokens < 0).any()):
        i = int((tokens < 0).nonzero()[0, 0])
        row = logits[int(row_index[i])].float()
        if bool(torch.isfinite(row).any()) and not bool((torch.isnan(row) | (row == float("inf"))).any()):
            raise ValueError(
                f"logits row {int(row_index[i])} (output row {i}) divided by temperature[{i}] = "
                f"{float(temp[i]):.4g} overflows float32: use a larger temperature, or 0 for greedy decoding"
            )
        raise ValueError(
            f"logits row {int(row_index[i])} (output row {i}) contains NaN or +inf, or has no finite value: "
            "cannot sample from it"
        )
    return (tokens, logprobs) if return_logprobs else tokens
