"""Suite ``distributed``: one DPO step (reference pass + policy fw-bw) on a vocab-parallel lm-head split over 2
gloo processes on this CPU, next to the same step on one process with the whole head; and the bytes each rank hands
to the all-reduces per step, from the formula and counted.

The benchmark process itself is rank 0 of a 2-process gloo group on 127.0.0.1; a helper process (rank 1) is started
at the first case and runs the same step whenever rank 0 does (one broadcast of a 16-byte command first, inside the
timed region). Rank 0's wall time of the step is what the harness times; its peak memory is rank 0's alone. Each
process of the group runs 1 thread, the one-process rows the harness's default threads, so both use the machine's
2 cores. CPU only: multi-GPU (NCCL) speed is not measured here.
"""

from __future__ import annotations

import atexit
import os
from typing import Dict, List, Optional, Tuple

import torch

from prefkern.fused import CatalogObjective, EngineOptions, fused_loss, token_logps_no_grad

from ..harness import Case

DEFAULT_DTYPES = {"cpu": [torch.float32], "cuda": []}
REPS = {"cpu": 3}
WORLD = 2
BETA = 0.1

# (pairs, T, H, V)
CPU_SIZES = [(2, 256, 1024, 32000)]
QUICK_SIZES = [(2, 64, 256, 8000)]
MODES = ("eager", "stream")
IGNORE = -100


def bytes_per_step(scored: int, hidden_size: int, mode: str) -> int:
    """Bytes each rank hands to the all-reduces in one vocab-parallel DPO step: the reference pass and the policy
    forward each 4 (MAX) + 12 (SUM) bytes per scored token, the policy backward 4 H (the fp32 partial dX); eager
    mode adds one int64 (the agreed chunk) per call."""
    return 2 * 16 * scored + 4 * hidden_size * scored + (8 if mode == "eager" else 0)


def make_inputs(pairs: int, t: int, h: int, v: int, dtype: torch.dtype):
    """The same batch and whole head on every rank (seeded): x, w, y, ref_x."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2 * pairs, t, h, generator=gen).to(dtype)
    w = (torch.randn(v, h, generator=gen) / h**0.5).to(dtype)
    rx = (x + 0.01 * torch.randn(x.shape, generator=gen)).to(dtype)
    y = torch.randint(0, v, (2 * pairs, t), generator=gen)
    y[:, : t // 4] = IGNORE  # prompt
    return x, w, y, rx


def one_process_step(x, w, y, rx, mode: str) -> None:
    """DPO with a reference model on the whole head, prefkern's fused engine (what the README's rows use)."""
    ref = token_logps_no_grad(rx, w, None, y, IGNORE, "auto")
    objective = CatalogObjective("sigmoid", {"beta": BETA}, y != IGNORE, ref_tokens=ref)
    fused_loss(x, w, None, y, objective, EngineOptions(ignore_index=IGNORE, mode=mode)).output.loss.backward()


def vocab_parallel_step(x, shard, y, rx, ref_shard, mode: str, rank: int, world: int, v: int) -> None:
    from prefkern.distributed import VocabParallel, vocab_parallel_fused_loss, vocab_parallel_token_logps_no_grad

    per = -(-v // world)
    vp = VocabParallel(None, min(v, rank * per), min(v, (rank + 1) * per))
    ref = vocab_parallel_token_logps_no_grad(rx, ref_shard, None, y, IGNORE, vp)
    objective = CatalogObjective("sigmoid", {"beta": BETA}, y != IGNORE, ref_tokens=ref)
    vocab_parallel_fused_loss(x, shard, None, y, objective, EngineOptions(ignore_index=IGNORE, mode=mode),
                              vp).output.loss.backward()


class _Config:
    """One (size, dtype) of the suite, as every rank builds it: inputs and this rank's slice."""

    def __init__(self, size: Tuple[int, int, int, int], dtype: torch.dtype, rank: int, world: int) -> None:
        pairs, t, h, v = size
        self.v = v
        x, w, self.y, self.rx = make_inputs(pairs, t, h, v, dtype)
        per = -(-v // world)
        start, stop = min(v, rank * per), min(v, (rank + 1) * per)
        self.x = x.requires_grad_()
        self.shard = w[start:stop].clone().requires_grad_()
        self.ref_shard = w[start:stop].clone()

    def step(self, mode: str, rank: int, world: int) -> None:
        self.x.grad = None
        self.shard.grad = None
        vocab_parallel_step(self.x, self.shard, self.y, self.rx, self.ref_shard, mode, rank, world, self.v)


def _command(code: int, config: int) -> torch.Tensor:
    return torch.tensor([code, config], dtype=torch.int64)


def _helper(port: int, world: int, rank: int, sizes, dtypes) -> None:
    """Rank >= 1: waits for rank 0's command (config index, mode) and runs the same step; code -1 stops."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    configs: Dict[int, _Config] = {}
    keys = [(s, d) for d in dtypes for s in sizes]
    while True:
        cmd = _command(0, 0)
        dist.broadcast(cmd, src=0)
        code, index = int(cmd[0]), int(cmd[1])
        if code < 0:
            break
        if index not in configs:
            configs[index] = _Config(keys[index][0], keys[index][1], rank, world)
        configs[index].step(MODES[code], rank, world)
    dist.destroy_process_group()


class _Group:
    """Rank 0 (this process) and its helpers, started once for the suite and stopped at exit."""

    def __init__(self, sizes, dtypes) -> None:
        import torch.distributed as dist
        import torch.multiprocessing as mp

        from prefkern.distributed.launch import free_port

        self.keys = [(s, d) for d in dtypes for s in sizes]
        self.configs: Dict[int, _Config] = {}
        port = free_port()
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=_helper, args=(port, WORLD, r, sizes, dtypes), daemon=True)
                      for r in range(1, WORLD)]
        for p in self.procs:
            p.start()
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=WORLD)
        atexit.register(self.close)

    def step(self, index: int, mode: str) -> None:
        import torch.distributed as dist

        if index not in self.configs:
            self.configs[index] = _Config(self.keys[index][0], self.keys[index][1], 0, WORLD)
        dist.broadcast(_command(MODES.index(mode), index), src=0)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            self.configs[index].step(mode, 0, WORLD)
        finally:
            torch.set_num_threads(threads)

    def count_bytes(self, index: int, mode: str) -> Tuple[int, int]:
        """(bytes, all-reduce calls) rank 0 hands to the collectives in one step (counted by wrapping them)."""
        from prefkern.distributed import set_collective_hook

        sent: List[int] = []
        set_collective_hook(lambda op, t: sent.append(t.numel() * t.element_size()))
        try:
            self.step(index, mode)
        finally:
            set_collective_hook(None)
        return sum(sent), len(sent)

    def close(self) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            return
        dist.broadcast(_command(-1, 0), src=0)
        for p in self.procs:
            p.join(30)
            if p.is_alive():
                p.kill()
        dist.destroy_process_group()


_GROUP: Optional[_Group] = None


def cases(device: torch.device, dtypes: List[torch.dtype], quick: bool) -> Tuple[List[Case], List[str]]:
    global _GROUP
    if device.type != "cpu" or not dtypes:
        return [], ["distributed: a CPU suite (2 gloo processes); multi-GPU (NCCL) speed is not measured here."]
    sizes = QUICK_SIZES if quick else CPU_SIZES
    if _GROUP is None:
        _GROUP = _Group(sizes, dtypes)
    out: List[Case] = []
    notes = [f"vp-x{WORLD}-<mode> = the head split by rows over {WORLD} gloo processes on this CPU "
             "(prefkern.distributed, 1 thread each; time and memory of rank 0); one-process-<mode> = the whole head "
             "on this process (the harness's threads). Both: DPO with a reference pass (1 matmul unit) and the "
             "policy's forward and backward. FLOPs: the GEMM floor 8 N H V over the N scored tokens (all ranks "
             "together), as the preference suite counts it."]
    for index, (size, dtype) in enumerate(_GROUP.keys):
        pairs, t, h, v = size
        name = f"B={pairs} T={t} H={h} V={v}"
        dname = str(dtype).replace("torch.", "")
        x, w, y, rx = make_inputs(pairs, t, h, v, dtype)
        x.requires_grad_()
        w.requires_grad_()
        scored = int((y != IGNORE).sum())

        def fresh(x=x, w=w, y=y, rx=rx):
            x.grad = None
            w.grad = None
            return x, w, y, rx

        for mode in MODES:
            counted, calls = _GROUP.count_bytes(index, mode)
            formula = bytes_per_step(scored, h, mode)
            notes.append(f"{name} {dname} {mode}: {scored} scored tokens; all-reduce bytes per rank per step "
                         f"{formula} by the formula (2 x 16 B + 4 H B per token{' + 8' if mode == 'eager' else ''}), "
                         f"{counted} counted in {calls} calls; an all-gather of the fp32 logits of the policy and "
                         f"reference passes would be {2 * scored * v * 4 // WORLD * (WORLD - 1)} B per rank.")
            floor = 8.0 * scored * h * v  # the GEMM floor: reference forward + policy forward, dX, dW
            out.append(Case("distributed", f"one-process-{mode}", "fw-bw", name, dname, fresh,
                            lambda s, mode=mode: one_process_step(*s, mode), flops=floor,
                            baseline="one-process-eager"))
            out.append(Case("distributed", f"vp-x{WORLD}-{mode}", "fw-bw", name, dname, lambda: None,
                            lambda _s, index=index, mode=mode: _GROUP.step(index, mode), flops=floor,
                            baseline="one-process-eager"))
    return out, notes
