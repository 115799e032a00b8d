"""Run a function on ``world`` local processes (gloo, or NCCL on GPUs) meeting on 127.0.0.1, with a deadline.

:func:`spawn` starts ``world`` processes (``torch.multiprocessing``, spawn context), each joins a gloo process group
on ``127.0.0.1`` at a free port, runs ``fn(rank, world, *args)`` and sends back what it returns (torch-saveable). A
process that fails makes :func:`spawn` raise with its traceback; past ``timeout`` seconds every process is killed and
:func:`spawn` raises ``TimeoutError``. Nothing reaches an address other than 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from typing import Any, Callable, List, Sequence

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (bound once to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: Sequence[Any], out_dir: str, threads: int,
            backend: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
                      RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        try:
            result = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        torch.save({"ok": True, "result": result}, path)
    except BaseException:  # noqa: BLE001 - the parent reports it
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise


def spawn(fn: Callable, world: int, *args: Any, timeout: float = 60.0, threads: int = 1,
          backend: str = "gloo") -> List[Any]:
    """``[fn(0, world, *args), ..., fn(world - 1, world, *args)]``, each run in its own gloo process.

    Parameters
    ----------
    fn : a module-level function ``fn(rank, world, *args)`` (picklable); its return value must be torch-saveable.
    world : number of processes (>= 1).
    timeout : seconds for the whole run (start-up included); past it every process is killed, ``TimeoutError``.
    threads : torch intra-op threads per process.
    backend : ``"gloo"`` (CPU) or ``"nccl"`` (rank r on ``cuda:r``; the rendezvous still on 127.0.0.1).
    """
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive int, got {world!r}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="prefkern-dist-") as out_dir:
        port = free_port()
        procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, out_dir, threads, backend), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        try:
            while any(p.is_alive() for p in procs):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{getattr(fn, '__name__', fn)} on {world} processes ran past {timeout} s")
                if any(p.exitcode not in (None, 0) for p in procs):
                    break  # one failed: the others may wait on it forever
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join(5)
        results, errors = [], []
        for r in range(world):
            path = os.path.join(out_dir, f"rank{r}.pt")
            if not os.path.exists(path):
                errors.append(f"rank {r}: exit code {procs[r].exitcode}, no result")
                continue
            got = torch.load(path, weights_only=False)
            if got["ok"]:
                results.append(got["result"])
            else:
                errors.append(f"rank {r}:\n{got['error']}")
        if errors:
            raise RuntimeError(f"{getattr(fn, '__name__', fn)} failed on {world} processes:\n" + "\n".join(errors))
        return results


__all__ = ["free_port", "spawn"]
