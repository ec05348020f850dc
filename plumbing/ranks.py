"""Several processes: `torchrun --nproc_per_node=N script.py ...` sets WORLD_SIZE, RANK and
LOCAL_RANK; each process then takes its share of a step's questions. The losses are divided by
the whole step's counts, so the SUM of the processes' gradients is the one-process gradient.
Alone (no torchrun), every helper here returns its input and calls nothing.
"""
import contextlib
import dataclasses
import os

import torch
import torch.distributed as dist

def world_size():
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_ranks(device):
    """(rank, world size): (0, 1) alone; under torchrun, after joining the process group (NCCL on
    GPUs, gloo on CPU)."""
    if world_size() == 1:
        return 0, 1
    if not dist.is_initialized():
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return dist.get_rank(), dist.get_world_size()


def share(items, rank, world):
    """This process's contiguous part of a list (the parts' sizes differ by at most one)."""
    return items[rank * len(items) // world:(rank + 1) * len(items) // world]


def comm_device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(values):
    """Element-wise sums over the processes of a list of numbers."""
    if world_size() == 1:
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=comm_device())
    dist.all_reduce(total)
    return total.tolist()


def gather(values):
    """Every process's list, concatenated in rank order: rank r's share lands where it came from."""
    if world_size() == 1:
        return values
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, values)
    return [v for part in parts for v in part]


def from_rank0(value):
    """Rank 0's value on every process (e.g. a decision only rank 0 may take)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_gradients(params):
    """p.grad ← Σ_ranks p.grad, in one flat buffer (a process with no kept sample adds zeros)."""
    if world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p)


def barrier():
    if world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def rank0_first(rank):
    """Rank 0 runs the block before the other processes do: it may write what they then read."""
    if rank > 0:
        barrier()
    yield
    if rank == 0:
        barrier()


def child_group_env():
    """The environment for a child process (eval.py after training) that forms its own group of
    the same ranks: a free port on rank 0's host, the same on all ranks. None when alone."""
    if world_size() == 1:
        return None
    port = None
    if dist.get_rank() == 0:
        import socket
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
    env = {**os.environ, "MASTER_PORT": str(from_rank0(port))}
    env.pop("TORCHELASTIC_USE_AGENT_STORE", None)  # the child hosts its own store on that port
    return env


# What a collective raises on a survivor when another process of the group died (gloo, NCCL).
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote worker", "Broken pipe",
             "communicator was aborted", "collective operation timeout")


def peer_failure(error):
    """True when `error` says another process of this torchrun group is gone: the survivors then
    stop with one line (common.user_errors), the dead process's own log says why."""
    return world_size() > 1 and (isinstance(error, dist.DistError) or any(p in str(error) for p in PEER_GONE))


def leave_group():
    if dist.is_initialized():
        dist.destroy_process_group()


def gather_rollouts(world_size, rollouts, analysed):
    """7. Under torchrun, every process's rollouts (a selfdistill.Rollouts) and analysed rollouts in
    rank order, for rank 0's log; alone, as they are."""
    if world_size == 1:
        return rollouts, analysed
    lists = {f.name: gather(getattr(rollouts, f.name)) for f in dataclasses.fields(rollouts) if f.name != "rewards"}
    return (dataclasses.replace(rollouts, rewards=torch.tensor(gather(rollouts.rewards.tolist())), **lists),
            gather(analysed))
