"""Data-parallel runs on torch.distributed: which process runs which batch, and how results reach rank 0.

embedlens does not schedule processes itself: ``torchrun --nproc-per-node N -m
embedlens run PLAN.yaml`` (or ``accelerate launch -m embedlens run ...``) starts
them and sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; `World.from_env` reads
those and `World.init` joins the process group (gloo on CPU, nccl on CUDA).

Batch ``b`` belongs to rank ``b % WORLD_SIZE``. Batches go in rounds of
``WORLD_SIZE``: each rank runs the model on its batch of the round (the forward
passes and the interventions, the costly part), then sends what it computed to
rank 0 (`send` / `recv`: safetensors bytes and JSON, never pickle), which
folds every batch into the probes, the partition evidence, the data-set means
and the effect summary *in batch order*, exactly as one process would. That is
why the final folder is the same, byte for byte, as a single-process run's:
nothing is summed in another order (see `embedlens.plan.runner`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from embedlens.errors import EmbedLensError

#: Environment variables torchrun and accelerate launch set for every process.
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistributedError(EmbedLensError):
    """A data-parallel run that cannot start or whose processes disagree."""


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel run (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "World":
        """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (one process when they are absent).

        Raises:
            DistributedError: a variable is not an integer, the rank is outside ``0..WORLD_SIZE-1``, or a
                group of several processes lacks ``RANK``, ``MASTER_ADDR`` or a valid ``MASTER_PORT``.
        """
        env = os.environ if env is None else env
        if "WORLD_SIZE" not in env:
            return cls()
        values = {}
        for key in ENV:
            raw = env.get(key, "0")
            try:
                values[key] = int(raw)
            except ValueError:
                raise DistributedError(f"{key}={raw!r}: expected an integer (set by torchrun / accelerate launch)") from None
        size, rank = values["WORLD_SIZE"], values["RANK"]
        if size < 1 or not 0 <= rank < size:
            raise DistributedError(f"RANK={rank}, WORLD_SIZE={size}: the rank must be in 0..WORLD_SIZE-1")
        if not 0 <= values["LOCAL_RANK"] < size:
            raise DistributedError(f"LOCAL_RANK={values['LOCAL_RANK']}, WORLD_SIZE={size}: the local rank must be in 0..WORLD_SIZE-1")
        if size > 1:
            _check_rendezvous(env, size)
        return cls(rank, size, values["LOCAL_RANK"])

    @property
    def main(self) -> bool:
        """Rank 0: folds, checkpoints and writes the final files."""
        return self.rank == 0

    def owner(self, batch: int) -> int:
        """The rank that runs batch `batch` (round robin: the same on every rank, whatever was resumed)."""
        return batch % self.size

    def init(self, backend: str | None = None) -> None:
        """Join the process group (``env://``, as torchrun sets it up); gloo without CUDA, nccl with it."""
        import torch
        import torch.distributed as dist

        if self.size == 1 or dist.is_initialized():
            return
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(self.local_rank)
        dist.init_process_group(backend=backend, rank=self.rank, world_size=self.size)


def _check_rendezvous(env, size: int) -> None:
    """What ``env://`` needs to join a group of `size`, set as torchrun sets it; checked before torch reads it
    (torch raises ``ValueError: ... MASTER_ADDR expected`` from deep in its rendezvous)."""
    launched = "(torchrun and accelerate launch set them; started by hand, set all of them)"
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if not str(env.get(key, "")).strip():
            raise DistributedError(f"WORLD_SIZE={size} but {key} is not set: a run over several processes needs RANK, "
                                   f"LOCAL_RANK, MASTER_ADDR and MASTER_PORT {launched}")
    port = str(env["MASTER_PORT"]).strip()
    if not (port.isdigit() and 1 <= int(port) <= 65535):
        raise DistributedError(f"MASTER_PORT={port!r}: expected a port number in 1..65535 {launched}")


_CURRENT = World()


def current() -> World:
    """The world this process runs in (set by `activate`; one process otherwise)."""
    return _CURRENT


def activate(world: World) -> World:
    """Make `world` the current one (the CLI calls this with `World.from_env` before a run) and join its group."""
    global _CURRENT
    world.init()
    _CURRENT = world
    return world


def _transfer_device() -> torch.device:
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def send(data: bytes, dst: int) -> None:
    """Send bytes to rank `dst` (length first, then the bytes as a uint8 tensor)."""
    import torch
    import torch.distributed as dist

    dev = _transfer_device()
    dist.send(torch.tensor([len(data)], dtype=torch.int64, device=dev), dst)
    if data:
        dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev), dst)


def recv(src: int) -> bytes:
    """Receive the bytes `send` sent from rank `src`."""
    import torch
    import torch.distributed as dist

    dev = _transfer_device()
    n = torch.zeros(1, dtype=torch.int64, device=dev)
    dist.recv(n, src)
    if int(n) == 0:
        return b""
    buf = torch.empty(int(n), dtype=torch.uint8, device=dev)
    dist.recv(buf, src)
    return buf.cpu().numpy().tobytes()


def broadcast(data: bytes | None, world: World) -> bytes:
    """Rank 0's bytes on every rank."""
    if world.size == 1:
        return data or b""
    if world.main:
        for r in range(1, world.size):
            send(data or b"", r)
        return data or b""
    return recv(0)


def barrier(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist

        dist.barrier()


def settle(error: EmbedLensError | None, world: World) -> None:
    """Rank 0's refusal, raised on every rank together: rank 0 passes its error (or None), every other rank None.

    Every rank learns of rank 0's refusal (a foreign folder, an unfinished run without --resume) and stops with
    it, instead of waiting in a collective rank 0 never reaches (a gloo traceback once rank 0 is gone). The ranks
    meet once more before raising, so none has exited while another still reads the message.

    Raises:
        EmbedLensError: rank 0's own error on rank 0; `DistributedError` ("rank 0 stopped: ...") on the others.
    """
    if world.size == 1:
        if error is not None:
            raise error
        return
    msg = broadcast(str(error).encode("utf-8") if world.main and error is not None else b"", world)
    if not msg:
        return
    barrier(world)
    if world.main and error is not None:
        raise error
    raise DistributedError(f"rank 0 stopped: {msg.decode('utf-8', 'replace')}")


def peer_failure(e: BaseException) -> "DistributedError | None":
    """A torch.distributed error from a collective whose peer is gone, as an error without a traceback (or None).

    A rank that stops (its own error, a kill) closes its connections; the others fail in whatever send, receive
    or barrier they were in. Their message then says so and points at the first rank's own message.
    """
    if _CURRENT.size == 1 or isinstance(e, EmbedLensError):
        return None
    import torch.distributed as dist

    kinds = tuple(k for k in (getattr(dist, "DistError", None), RuntimeError) if k is not None)
    text = str(e)
    if isinstance(e, kinds) and (isinstance(e, kinds[:-1]) or any(w in text.lower() for w in ("gloo", "connection", "nccl", "peer", "socket"))):
        return DistributedError(f"rank {_CURRENT.rank}: another process of this run stopped ({text.splitlines()[0][:200] if text else type(e).__name__}); "
                                "its own message above says why. Finished batches are kept: fix the cause and continue with --resume")
    return None


def agree(value: Any, world: World, what: str) -> None:
    """Check that every rank holds the same JSON-able `value` (e.g. the plan hash, the number of batches).

    Raises:
        DistributedError: naming `what` and the ranks' values.
    """
    import torch

    if world.size == 1:
        return
    mine = json.dumps(value, sort_keys=True, default=str).encode()
    theirs = broadcast(mine if world.main else None, world)
    ok = torch.tensor([int(theirs == mine)])
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        ok = ok.cuda()
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not int(ok):
        raise DistributedError(f"the processes of this run disagree on {what} (rank 0: {theirs.decode()[:200]}, rank {world.rank}: "
                               f"{mine.decode()[:200]}); every rank must run the same plan on the same data")


# -- what a rank sends rank 0 for one batch ------------------------------------------
def pack(tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> bytes:
    """A batch's payload: named tensors and a JSON document, as one safetensors file (data, never code)."""
    from safetensors.torch import save

    # a copy each: two sites may be views of one tensor, which safetensors refuses to save
    return save({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, metadata={"embedlens": json.dumps(doc)})


def unpack(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of `pack`."""
    from safetensors.torch import load

    tensors = load(data)
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    return tensors, json.loads(header.get("__metadata__", {}).get("embedlens", "{}"))
