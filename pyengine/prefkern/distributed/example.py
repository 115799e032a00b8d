"""A vocab-parallel DPO step on 2 (or more) CPU processes, checked against the unsplit head.

Run::

    torchrun --standalone --nproc_per_node=2 -m prefkern.distributed.example

Every rank holds the same batch and its rows ``[start, stop)`` of the lm-head; the token log-probs, the DPO loss
and the gradients equal those of the whole head on one process (checked on every rank), and the bytes each rank
hands to the all-reduces are counted.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import prefkern
from prefkern.distributed import VocabParallel, set_collective_hook, vocab_parallel_linear_logprobs


def main() -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same head and batch on every rank
    pairs, t, h, v = 4, 32, 64, 1001
    weight = torch.randn(v, h) / h**0.5
    hidden = torch.randn(2 * pairs, t, h)  # [chosen; rejected]
    labels = torch.randint(0, v, (2 * pairs, t))
    labels[:, : t // 4] = -100  # prompt
    ref_logps = torch.randn(2 * pairs) - 50.0  # reference sequence log-probs

    per = -(-v // world)
    start, stop = min(v, rank * per), min(v, (rank + 1) * per)
    shard = weight[start:stop].clone().requires_grad_()
    x = hidden.clone().requires_grad_()
    sent = []
    set_collective_hook(lambda op, tensor: sent.append(tensor.numel() * tensor.element_size()))

    tok = vocab_parallel_linear_logprobs(x, shard, labels, None, VocabParallel(None, start, stop))
    seq = tok.sum(-1)
    loss = prefkern.dpo_loss(seq[:pairs], seq[pairs:], ref_logps[:pairs], ref_logps[pairs:], beta=0.1).loss
    loss.backward()
    set_collective_hook(None)

    # the same step with the whole head on this process
    w_full = weight.clone().requires_grad_()
    x_full = hidden.clone().requires_grad_()
    seq_full = prefkern.linear_logprobs(x_full, w_full, labels).sum(-1)
    prefkern.dpo_loss(seq_full[:pairs], seq_full[pairs:], ref_logps[:pairs], ref_logps[pairs:],
                      beta=0.1).loss.backward()
    err = max(float((x.grad - x_full.grad).abs().max()), float((shard.grad - w_full.grad[start:stop]).abs().max()))
    scored = int((labels != -100).sum())
    line = (f"rank {rank}/{world}: rows [{start}, {stop}) of V={v}, loss {loss.item():.6f}, "
            f"max |grad - unsplit grad| {err:.2e}, {len(sent)} all-reduces, {sum(sent)} bytes "
            f"({sum(sent) / scored:.0f} per scored token; formula 4 + 12 + 4H = {16 + 4 * h})")
    for r in range(world):  # print in rank order
        if r == rank:
            print(line, flush=True)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
