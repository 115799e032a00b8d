"""prefkern past one device (DESIGN.md section 10): on ``torch.distributed``, no communication layer of its own.

Data parallel (DDP, FSDP2, ZeRO-3-style gathered heads)
--------------------------------------------------------
Nothing to switch on. Both modes of :class:`prefkern.FusedLinearPreferenceLoss` (and :mod:`prefkern.compat.liger`,
:class:`prefkern.EnsembleRewardHead`) return their gradients through autograd: the eager mode's gradients, taken
inside forward, come back from a custom ``autograd.Function`` in ``loss.backward()``, so DDP's and FSDP's hooks see
and reduce them as any other gradient. Normalisation: each rank's loss is the mean over its own pairs, and DDP
(and FSDP2's reduce-scatter) average the gradients over the ranks, so with equal per-rank batches one step equals
one process on the whole batch with the mean over all pairs (TRL's convention).

- **FSDP2** (``fully_shard``): outside forward a sharded module's ``lm_head.weight`` is a ``Shard(0)`` DTensor
  over the data-parallel ranks. Call the loss *inside* the forward of the ``fully_shard`` unit whose parameters
  include the lm-head (FSDP gathers the weight for that forward and for its backward, and reduce-scatters its
  gradient; a head sharded as a unit of its own is gathered only in its own forward); a DTensor weight given to
  the loss outside raises ``TypeError``; ``module.unshard()`` outside forward is no way either (the loss runs, the
  gradient never reaches the sharded parameter). See ``tests/test_distributed.py`` for the pattern.
- **ZeRO-3-style gathered heads** (a weight materialised only inside a gather, e.g. DeepSpeed's
  ``GatheredParameters``): call the loss *and* ``backward()`` (``engine.backward``) inside the gather, in either
  mode, with the loss module outside the engine's module tree (ZeRO-3 hooks every submodule's forward and
  backward). prefkern keeps no reference to the gathered storage past the call, and the gradient lands on the
  parameter, whose hooks partition it. ``backward()`` after the gather fails loudly in both modes: torch's
  ``AccumulateGrad`` lays the ``[V, H]`` gradient out like the parameter, which is empty by then.

Tensor parallel: a vocab-parallel lm-head
-----------------------------------------
Each rank of a group holds rows ``[start, stop)`` of the head and the same hidden states and labels:
:func:`vocab_parallel_linear_logprobs` (and :func:`~.engine.vocab_parallel_fused_loss` for the fused losses, both
modes) give the values and gradients of the unsplit head. Communication per scored token: forward one ``MAX``
all-reduce of 4 bytes and one ``SUM`` all-reduce of 12 bytes; backward one ``SUM`` all-reduce of ``4 H`` bytes
(the partial ``dX`` in fp32); none for ``dW``. A ``Shard(0)`` DTensor weight on a 1-D mesh is taken with
``True`` in place of a :class:`VocabParallel`.

Example (``torchrun --standalone --nproc_per_node=2 -m prefkern.distributed.example``)::

    import torch, torch.distributed as dist
    from prefkern.distributed import VocabParallel, vocab_parallel_linear_logprobs

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)                                # the same full head and batch on every rank
    V, H = 37, 16
    weight = torch.randn(V, H)
    hidden = torch.randn(4, 6, H, requires_grad=True)
    labels = torch.randint(0, V, (4, 6))
    per = -(-V // world)
    start, stop = min(V, rank * per), min(V, (rank + 1) * per)
    shard = weight[start:stop].clone().requires_grad_()
    logp = vocab_parallel_linear_logprobs(hidden, shard, labels, None, VocabParallel(None, start, stop))
    logp.sum().backward()                               # shard.grad: this rank's rows of dW; hidden.grad: full dX
"""

from .vocab_parallel import (
    FORWARD_MAX_BYTES_PER_TOKEN, FORWARD_SUM_BYTES_PER_TOKEN, VocabParallel, backward_bytes_per_token, check_inputs,
    resolve_vocab_parallel, set_collective_hook, vocab_parallel_linear_logprobs, vocab_parallel_token_logps_no_grad,
)

_ENGINE = ("agreed_eager_chunk", "vocab_parallel_eager_gradients", "vocab_parallel_fused_loss")


def __getattr__(name: str):
    # the engine's entry points load on first use: prefkern.fused.engine imports this package's vocab_parallel
    # module, and .engine imports prefkern.fused.engine
    if name in _ENGINE:
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["VocabParallel", "vocab_parallel_linear_logprobs", "vocab_parallel_token_logps_no_grad",
           "vocab_parallel_eager_gradients", "vocab_parallel_fused_loss", "agreed_eager_chunk",
           "resolve_vocab_parallel", "check_inputs", "set_collective_hook", "backward_bytes_per_token",
           "FORWARD_MAX_BYTES_PER_TOKEN", "FORWARD_SUM_BYTES_PER_TOKEN"]
