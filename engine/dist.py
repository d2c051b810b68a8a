"""Distributed plumbing in one place: process group, rank-0 printing, seeding, DDP wrapping, teardown.

Works the same under `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR set) and as a plain
`python -m engine.train` (world size 1, no process group at all).
"""
from __future__ import annotations

import ctypes
import datetime
import inspect
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel as DDP

from engine.config import ConfigError


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


_STATE = Dist()


# How long a rank waits in a collective for the others. Evaluation with generation runs on rank 0 alone while
# the other ranks wait in the next step's all-reduce: 32 answers of up to 256 tokens from Llama 3.2 3B in NF4 on
# a T4 take several minutes, about NCCL's default of 10 (its watchdog would then kill the job). A rank that
# really hangs is reported after this long instead.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)


def uses_cuda(device: str) -> bool:
    """Whether a --device choice (auto, cpu, cuda) runs on CUDA: auto does where torch sees a GPU."""
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def init(device: str = "auto") -> Dist:
    """Join the process group torchrun set up (if any) and pick this rank's device.

    gloo on CPU, nccl on CUDA. With world size 1 no process group is created, so a single-process run has no
    distributed machinery in it at all.
    """
    global _STATE
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = uses_cuda(device)
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but torch sees no GPU (use --device cpu)")
    if use_cuda and local >= torch.cuda.device_count():  # else set_device fails with 'invalid device ordinal'
        raise ConfigError(f"process {local} of this machine needs GPU {local}, but torch sees "
                           f"{torch.cuda.device_count()} GPU(s): start one process per GPU (./launch.sh --nproc "
                           f"{torch.cuda.device_count()}, or torchrun --nproc_per_node {torch.cuda.device_count()})")
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not tdist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        kw = {"device_id": dev} if use_cuda else {}
        store = _store_for_this_attempt(world, backend)
        if store is not None:
            kw.update(store=store)
        tdist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT, **kw)
    _STATE = Dist(rank=rank, local_rank=local, world_size=world, device=dev)
    return _STATE


def _store_for_this_attempt(world: int, backend: str):
    """torchrun's key-value store with this restart's own key prefix, or None to let torch make the store.

    `torchrun --max-restarts K` starts the workers again after one fails, and they meet in the store the agent
    keeps for the whole job (`./launch.sh --max-restarts` starts a new torchrun instead, with a new store).
    torch 2.13's env:// set-up reuses that store without a prefix per attempt, so a restarted worker can read the
    address a dead worker of the previous attempt published, and gloo fails to connect ("connectFullMesh failed
    ... Connection refused") or waits until its timeout: here a plain init_process_group after a killed worker
    failed 8 times in 10 (a two-line script, no project code), and with this prefix 12 restarts in 12 came up.
    Where the agent does not keep the store (no TORCHELASTIC_USE_AGENT_STORE), rank 0 makes a fresh one each
    attempt and torch's own set-up is kept. `--standalone` (./launch.sh) always has the agent keep it, so every
    run under torchrun comes here, NCCL included, with the process group's timeout."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    store = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                           timeout=COLLECTIVE_TIMEOUT)
    return tdist.PrefixStore(f"clauselora/attempt_{attempt}", store)


def restart_attempt() -> int:
    """How many times this run's workers have been started again after a failure: by `./launch.sh --max-restarts`
    (CLAUSELORA_RESTART) or by torchrun's own `--max-restarts` (TORCHELASTIC_RESTART_COUNT); 0 for a first start.
    A restarted worker continues from the newest checkpoint by itself."""
    return max(int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), int(os.environ.get("CLAUSELORA_RESTART", "0")))


def get() -> Dist:
    return _STATE


def print0(*args, **kw):
    """print on rank 0 only (every rank printing the same line N times is noise)."""
    if _STATE.rank == 0:
        print(*args, **kw, flush=True)


def seed_all(seed: int):
    """Seed python, numpy and torch (CPU and every CUDA device) with one value."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_rank(seed: int, rank: int):
    """Per-rank stream for things that must differ between ranks (dropout masks).

    Model construction and LoRA init are seeded with the shared `seed` first (identical on every rank; DDP also
    broadcasts rank 0's trainable weights), then each rank switches to its own stream.
    """
    seed_all(seed + 1000003 * (rank + 1))


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op with one process). A sync point: every rank must call it.
    NCCL (the CUDA process group) reduces CUDA tensors only: a CPU tensor (the trainers' small counters) goes to
    this rank's GPU for the reduction and its sum is copied back."""
    if _STATE.enabled:
        if _STATE.device.type == "cuda" and x.device.type != "cuda":
            on_gpu = x.to(_STATE.device)
            tdist.all_reduce(on_gpu, op=tdist.ReduceOp.SUM)
            x.copy_(on_gpu)
        else:
            tdist.all_reduce(x, op=tdist.ReduceOp.SUM)
    return x


def barrier():
    if _STATE.enabled:
        # gloo barrier works on CPU; for nccl pass the device so it does not guess
        kw = {"device_ids": [_STATE.local_rank]} if _STATE.device.type == "cuda" else {}
        tdist.barrier(**kw)


def gather_objects(obj) -> list:
    """Every rank's `obj` on every rank (small python objects only: RNG states, counters)."""
    if not _STATE.enabled:
        return [obj]
    out = [None] * _STATE.world_size
    tdist.all_gather_object(out, obj)
    return out


def wrap_ddp(module: torch.nn.Module) -> torch.nn.Module:
    """DDP over the trainable parameters only; returns the module unchanged with one process.

    - Frozen base weights (NF4 buffers, embeddings, norms) are identical on every rank because every rank loads
      them from the same file, so we tell DDP to ignore them: no multi-GB broadcast at start-up and no buckets.
    - static_graph stays False: with it, a step whose first micro-batches run under no_sync (gradient
      accumulation, e.g. the T4 recipe's grad_accum 4) dies in DDP's reducer ("expect_autograd_hooks_ INTERNAL
      ASSERT", torch 2.13; tests/test_train_ddp.py). Non-reentrant checkpointing needs no static graph: the
      recomputation runs inside backward and each adapter's gradient hook still fires once.
      find_unused_parameters stays False: every adapter is used every step, and the search costs a graph walk.
    - no buffer sync (forward_sync_buffers / broadcast_buffers False): no buffer changes during training.
    """
    if not _STATE.enabled:
        return module
    ignore = [n for n, p in module.named_parameters() if not p.requires_grad]
    ignore += [n for n, _ in module.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(module, ignore)
    dev_ids = [_STATE.local_rank] if _STATE.device.type == "cuda" else None
    # torch >= 2.13 renames broadcast_buffers (and warns, once per rank, on the old name); every buffer is in the
    # ignore list above, so neither spelling syncs anything
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters \
        else {"broadcast_buffers": False}
    return DDP(module, device_ids=dev_ids, find_unused_parameters=False, static_graph=False,
               gradient_as_bucket_view=True, **no_sync)


def teardown():
    """Leave the process group; safe to call twice and after errors."""
    if tdist.is_available() and tdist.is_initialized():
        try:
            tdist.destroy_process_group()
        except Exception:  # an aborted group may refuse a clean destroy; we are exiting anyway
            pass


def exit_worker(code: int):
    """End the process with `code`: the last line of a command that torchrun may start.

    In a process that joined a process group (world size > 1) this is `os._exit` after flushing stdout and
    stderr, not `sys.exit`. Why: torch 2.13 never frees a gloo process group that a DDP module has used
    (destroy_process_group() leaves its worker threads running; a group without DDP is freed), and a gloo worker
    thread that drops the tensors of a finished collective (the last barrier keeps earlier works, e.g. the RNG
    all-gather of a checkpoint, alive) must take the GIL to do it. When it asks for the GIL after the interpreter
    has begun to shut down, Python ends that thread inside a C++ destructor and the whole process aborts:
    "terminate called without an active exception", SIGABRT, after a run that had finished and written
    everything. Measured here on the 2-core CPU machine: 8 of about 150 two-process runs (4 processes sharing the
    2 cores) ended that way; a core dump showed the main thread in Py_FinalizeEx and the aborting thread in
    ProcessGroupGloo::runLoop -> ~AsyncBarrierWork -> ~AsyncAllgatherWork -> TensorImpl::decref_pyobject.
    Skipping the interpreter's shutdown removes the race: what the commands write is flushed line by line
    (metrics.jsonl) or written whole and renamed into place before they return, and torch's compile workers watch
    their parent and exit with it. A one-process run (no process group) exits the usual way, atexit handlers
    included, and so does an error that propagates as a traceback (CLAUSELORA_DEBUG=1).
    """
    if not _STATE.enabled:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it anyway
            pass
    try:  # and C's own stdio buffers (NCCL_DEBUG=INFO writes through them), which os._exit does not flush
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # no C library to ask (not Linux or macOS)
        pass
    os._exit(code)
