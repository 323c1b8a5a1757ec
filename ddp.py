"""torchrun plumbing: one process per device, rank 0 writes (nanoGPT's and DiT's pattern).

`init_distributed` joins the job torchrun describes (RANK / WORLD_SIZE / LOCAL_RANK; NCCL on
CUDA, gloo on the CPU); without torchrun everything below is the single-process case of the
same code. Collectives on tensors (`all_mean`, `all_sum`, `all_cat`, `my_rows`), DDP wrapping,
and chunk-keyed sharding of generation (`chunk_seed`, `sharded`): chunk j's random numbers
depend on (seed, j) only, so any number of processes makes the same samples.

Usage:
    device = init_distributed(torch.device("cuda"))       # cuda:LOCAL_RANK under torchrun
    loss_mean = all_mean(loss.detach()).item()            # the same on every rank
    parts = sharded(n_chunks, run_chunk)                  # every chunk, gathered on every rank
"""
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm


@dataclass
class Dist:
    """This process's place in a torchrun job; rank 0 of 1 without torchrun."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


DIST = Dist()


def init_distributed(device: torch.device) -> torch.device:
    """Join the job torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK (NCCL on CUDA, gloo on
    the CPU), as nanoGPT's and DiT's train.py do, and return this rank's device (cuda:LOCAL_RANK).
    Without torchrun: the single process of the same code. Rank 0 alone writes files."""
    if "RANK" not in os.environ or dist.is_initialized():
        return device
    DIST.rank, DIST.world, DIST.local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.type == "cuda":
        device = torch.device("cuda", DIST.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def current_device() -> torch.device:
    """Where collectives run: this rank's GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if DIST.world > 1:
        dist.barrier()


def all_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of x over the ranks (x itself in a single process)."""
    if DIST.world == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / DIST.world


def all_sum(x: float) -> float:
    """The sum of a number over the ranks (in float64: counts stay exact)."""
    if DIST.world == 1:
        return x
    v = torch.tensor([x], dtype=torch.float64, device=current_device())   # NCCL: GPU tensors
    dist.all_reduce(v)
    return v.item()


def all_cat(x: torch.Tensor) -> torch.Tensor:
    """Every rank's x (the same shape on each), concatenated in rank order along dim 0."""
    if DIST.world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(DIST.world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def my_rows(x: torch.Tensor) -> torch.Tensor:
    """This rank's share of a tensor gathered with all_cat."""
    n = x.shape[0] // DIST.world
    return x[DIST.rank * n:(DIST.rank + 1) * n]


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP around `model` in a torchrun job (gradients averaged over ranks in backward; rank 0's
    weights broadcast at the start), the model itself in a single process."""
    if DIST.world == 1:
        return model
    wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    wrapped.cfg = getattr(model, "cfg", None)                           # what the losses read off the model
    return wrapped


def rank_seed(seed: int) -> int:
    """A seed of this rank's own random stream (each rank draws its own batches): seed + 1 000 003 * rank."""
    return seed + 1_000_003 * DIST.rank


def chunk_seed(seed: int, chunk: int) -> int:
    """The seed of generation chunk `chunk` of a run seeded `seed`: sampling randomness is keyed by
    (seed, chunk index), never by the process, so any number of ranks makes the same images."""
    return seed * 1_000_003 + chunk


def sharded(n_chunks: int, run_chunk: Callable, desc: str = "", progress: bool = False) -> list:
    """[run_chunk(0), ..., run_chunk(n_chunks - 1)] on every rank: rank r runs the chunks
    i = r mod world (whole chunks, so results do not depend on the process count) and the
    results (CPU tensors) are gathered in chunk order."""
    mine = {i: run_chunk(i) for i in tqdm(range(DIST.rank, n_chunks, DIST.world), desc=desc, leave=False,
                                          disable=not (progress and DIST.main))}
    if DIST.world > 1:
        parts: list = [None] * DIST.world
        dist.all_gather_object(parts, mine)
        mine = {i: out for part in parts for i, out in part.items()}
    return [mine[i] for i in range(n_chunks)]
