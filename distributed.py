"""torchrun processes: joining and leaving the job, and the few collectives the scripts use (each a
no-op in one process), DDP's wrapper and no_sync."""

import contextlib
import dataclasses
import os

import torch


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a torchrun job; rank 0 of 1 for a plain `python script.py`."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owner: bool = False  # True when setup_distributed started the process group (and cleanup ends it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the torchrun job described by RANK / WORLD_SIZE / LOCAL_RANK, or stay one process.

    Without RANK in the environment nothing happens. Under torchrun a CUDA run uses NCCL on
    cuda:LOCAL_RANK; everything else uses gloo. A process group already started by the caller (a test
    harness) is used as it is and left to the caller to end."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.get_rank())))
            torch.cuda.set_device(device)
        return DistInfo(dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size()), device
    if "RANK" not in os.environ:
        return DistInfo(), device
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    global _OWNS_GROUP
    _OWNS_GROUP = True
    return DistInfo(rank, local_rank, world_size, owner=True), device


_OWNS_GROUP = False  # setup_distributed started the process group, so cleanup_distributed ends it


def cleanup_distributed():
    """End the process group that setup_distributed started (no-op otherwise, e.g. a test's own group)."""
    import torch.distributed as dist

    global _OWNS_GROUP
    if _OWNS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWNS_GROUP = False


def _dist():
    """torch.distributed when a process group is running, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the running process group; (0, 1) without one."""
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def _comm_device(like: torch.device) -> torch.device:
    """NCCL only moves CUDA tensors; gloo only CPU ones."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier():
    """Wait for every rank (no-op in one process)."""
    if (dist := _dist()) is not None:
        dist.barrier()


def all_reduce_(t: torch.Tensor, mean: bool = False) -> torch.Tensor:
    """Sum (or average) t over ranks, in place; t unchanged in one process."""
    if (dist := _dist()) is None:
        return t
    x = t.to(_comm_device(t.device))
    dist.all_reduce(x)
    if mean:
        x = x / dist.get_world_size()
    t.copy_(x)
    return t


def all_reduce_mean(values: dict) -> dict:
    """{name: float or scalar tensor} -> {name: float}, averaged over ranks in one all-reduce."""
    keys = list(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if (dist := _dist()) is not None:
        t = t.to(_comm_device(t.device))
        dist.all_reduce(t)
        t = t.cpu() / dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (a stop request, a non-finite step)."""
    if (dist := _dist()) is None:
        return bool(flag)
    t = torch.tensor([int(bool(flag))], device=_comm_device(torch.device("cpu")))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's t along dim 0 in rank order (first dims may differ); t itself in one process."""
    if (dist := _dist()) is None:
        return t
    dev, dtype = t.device, t.dtype
    x = t.to(_comm_device(dev))
    if dtype == torch.int16:
        x = x.int()  # neither NCCL nor gloo reduces or gathers 16-bit integers everywhere
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(x)], device=x.device))
    n_max = int(max(s.item() for s in sizes))
    padded = torch.zeros((n_max, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: len(x)] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)]).to(dev, dtype)


def all_gather_objects(obj) -> list:
    """[rank 0's obj, rank 1's obj, ...] (a one-element list in one process)."""
    if (dist := _dist()) is None:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_module_state(module: torch.nn.Module):
    """Copy rank 0's parameters and buffers into every rank's module, in place.

    DDP broadcasts the parameters when it wraps a module, but buffers only with broadcast_buffers=True,
    and not at all for modules it never wraps (an EMA copy); this makes every rank start identical."""
    if (dist := _dist()) is None:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            x = t.detach().to(_comm_device(t.device))
            dist.broadcast(x, src=0)
            if x is not t:
                t.copy_(x)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def no_sync(model: torch.nn.Module, sync: bool):
    """DDP's no_sync() for a gradient-accumulation micro-step that must not all-reduce yet; a no-op when
    `sync` or when the model is not wrapped."""
    if sync or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()
