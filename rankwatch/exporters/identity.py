"""Who a training rank is: global/local rank, node, GPU and its place in the parallel layout.

Read from the launcher's environment without configuration:

* torchrun: ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
  ``TORCHELASTIC_RESTART_COUNT``;
* Slurm ``srun`` with one task per GPU: ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NTASKS``,
  ``SLURM_NTASKS_PER_NODE``, ``SLURM_RESTART_COUNT``, ``SLURMD_NODENAME``. torchrun's variables
  win when both are set (srun launching one torchrun per node sets ``SLURM_PROCID`` to the
  node index);
* node name: ``RANKWATCH_NODE``, else ``SLURMD_NODENAME``, else ``NODE_NAME`` (the usual
  Kubernetes downward-API variable: inside a pod the hostname is the pod's, not the node's),
  else the hostname — the same name dcgm-exporter puts in ``Hostname``;
* GPU: the physical index and UUID behind the rank's CUDA device, resolved through
  ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs) and NVML when a driver is present;
* parallel layout: ``RANKWATCH_TP_SIZE``, ``RANKWATCH_CP_SIZE``, ``RANKWATCH_PP_SIZE`` (or the
  ``tp_size``/``cp_size``/``pp_size`` arguments) give the tp/cp/dp/pp ranks in Megatron-LM's
  default order, see :func:`megatron_layout`.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelRanks:
    """This rank's coordinates in a 4D (tp, cp, dp, pp) layout."""

    tp: int
    cp: int
    dp: int
    pp: int


def megatron_layout(rank: int, world_size: int, *, tp_size: int = 1, cp_size: int = 1,
                    pp_size: int = 1) -> ParallelRanks:
    """Parallel ranks of global ``rank`` for Megatron-LM's default rank order ``tp-cp-ep-dp-pp``:
    tensor parallel innermost (adjacent ranks, i.e. the GPUs of one NVLink domain), then context
    parallel, data parallel, and pipeline parallel outermost::

        rank = tp + tp_size * (cp + cp_size * (dp + dp_size * pp))

    ``dp_size = world_size / (tp_size * cp_size * pp_size)``. Expert parallelism is folded into
    data parallelism in that order, so it does not change the tp/cp/dp/pp ranks. A job started
    with a different ``--order`` needs its ranks passed explicitly (``RankIdentity(pp=…, …)``).
    """
    for name, size in (("tp_size", tp_size), ("cp_size", cp_size), ("pp_size", pp_size)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be a positive integer, got {size!r}")
    model = tp_size * cp_size * pp_size
    if world_size < 1 or world_size % model:
        raise ValueError(f"world_size {world_size} is not a multiple of tp_size*cp_size*pp_size = {model}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    dp_size = world_size // model
    tp, rest = rank % tp_size, rank // tp_size
    cp, rest = rest % cp_size, rest // cp_size
    dp, pp = rest % dp_size, rest // dp_size
    return ParallelRanks(tp=tp, cp=cp, dp=dp, pp=pp)


@dataclass(frozen=True)
class RankIdentity:
    """Run-independent identity of one training process. ``None`` means unknown; the probe
    then exports an empty label value (which Prometheus treats as absent)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node: str = ""
    restart_count: int = 0
    gpu: int | None = None
    gpu_uuid: str | None = None
    pp: int | None = None
    tp: int | None = None
    dp: int | None = None
    cp: int | None = None

    def __post_init__(self) -> None:
        if self.rank < 0 or self.local_rank < 0 or self.world_size < 1:
            raise ValueError(f"invalid rank identity: rank={self.rank} local_rank={self.local_rank} "
                             f"world_size={self.world_size}")
        if self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} outside world of size {self.world_size}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, tp_size: int | None = None,
                 cp_size: int | None = None, pp_size: int | None = None,
                 resolve_gpu: bool = True) -> RankIdentity:
        """Identity of this process from torchrun / Slurm / hostname (see the module docstring).
        Raises ``ValueError`` when a variable is set but malformed — at start-up, never later."""
        env = os.environ if env is None else env
        rank = _int_env(env, "RANK", "SLURM_PROCID", default=0)
        local_rank = _int_env(env, "LOCAL_RANK", "SLURM_LOCALID", default=0)
        world_size = _int_env(env, "WORLD_SIZE", "SLURM_NTASKS", default=1)
        local_world_size = _int_env(env, "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", default=1)
        restart = _int_env(env, "TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT", default=0)
        node = (env.get("RANKWATCH_NODE") or env.get("SLURMD_NODENAME") or env.get("NODE_NAME")
                or socket.gethostname())
        ident = cls(rank=rank, local_rank=local_rank, world_size=world_size,
                    local_world_size=local_world_size, node=node, restart_count=restart)
        sizes = {k: v if v is not None else _int_env(env, f"RANKWATCH_{k.upper()}", default=1)
                 for k, v in (("tp_size", tp_size), ("cp_size", cp_size), ("pp_size", pp_size))}
        if any(v != 1 for v in sizes.values()) or any(
                f"RANKWATCH_{k.upper()}" in env for k in sizes):
            ident = ident.with_layout(**sizes)
        if resolve_gpu:
            ident = ident.with_gpu(env)
        return ident

    def with_layout(self, *, tp_size: int = 1, cp_size: int = 1, pp_size: int = 1) -> RankIdentity:
        """A copy with pp/tp/dp/cp derived from Megatron-style sizes (see :func:`megatron_layout`)."""
        lay = megatron_layout(self.rank, self.world_size, tp_size=tp_size, cp_size=cp_size, pp_size=pp_size)
        return dataclasses.replace(self, tp=lay.tp, cp=lay.cp, dp=lay.dp, pp=lay.pp)

    def with_gpu(self, env: Mapping[str, str] | None = None, device: int | None = None) -> RankIdentity:
        """A copy with ``gpu``/``gpu_uuid`` of the rank's CUDA device. ``device`` is the logical
        CUDA index; by default torch's current device when CUDA is initialised, else
        ``local_rank`` (the torchrun convention). Without GPU information the fields stay unknown."""
        env = os.environ if env is None else env
        if device is None:
            device = _torch_current_device()
        visible = [v.strip() for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        if env.get("CUDA_VISIBLE_DEVICES") is not None and not visible:
            return self  # CUDA_VISIBLE_DEVICES="" hides every GPU
        if device is None:
            device = self.local_rank if len(visible) != 1 else 0
        entry: str | None = None
        if visible:
            if device >= len(visible):
                return self
            entry = visible[device]
        gpu, uuid = _nvml_lookup(entry if entry is not None else str(device))
        if gpu is None and uuid is None:
            if entry is None:
                return self  # no driver, no CUDA_VISIBLE_DEVICES: this is not a GPU process
            if entry.isdigit():
                gpu = int(entry)
            elif entry.startswith("GPU-"):
                uuid = entry
        return dataclasses.replace(self, gpu=gpu if gpu is not None else self.gpu,
                                   gpu_uuid=uuid if uuid is not None else self.gpu_uuid)

    def info_labels(self) -> dict[str, str]:
        """Label values of ``rankwatch_rank_info`` beyond the per-series labels."""
        def s(v: object) -> str:
            return "" if v is None else str(v)
        return {"world_size": str(self.world_size), "local_world_size": str(self.local_world_size),
                "restart_count": str(self.restart_count), "gpu": s(self.gpu), "gpu_uuid": s(self.gpu_uuid),
                "pp": s(self.pp), "tp": s(self.tp), "dp": s(self.dp), "cp": s(self.cp)}


def _int_env(env: Mapping[str, str], *names: str, default: int) -> int:
    for name in names:
        raw = env.get(name)
        if raw is None or raw == "":
            continue
        # SLURM_NTASKS_PER_NODE may read "8(x4)": the count before the repetition suffix.
        head = raw.split("(", 1)[0].split(",", 1)[0].strip()
        try:
            return int(head)
        except ValueError:
            raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None
    return default


def _torch_current_device() -> int | None:
    # Only look when the training script already uses CUDA: importing torch or initialising
    # CUDA here would cost seconds and grab GPU memory on the wrong device.
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if torch.cuda.is_initialized():
            return int(torch.cuda.current_device())
    except Exception:
        return None
    return None


def _nvml_lookup(entry: str) -> tuple[int | None, str | None]:
    """(physical index, UUID) of a CUDA_VISIBLE_DEVICES entry (index or UUID) through NVML;
    (None, None) without a driver. Any NVML failure means "unknown", never an error."""
    try:
        import pynvml
    except ImportError:
        return None, None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None, None
    try:
        if entry.isdigit():
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(entry))
        else:
            handle = pynvml.nvmlDeviceGetHandleByUUID(entry)
        index = int(pynvml.nvmlDeviceGetIndex(handle))
        uuid = pynvml.nvmlDeviceGetUUID(handle)
        if isinstance(uuid, bytes):
            uuid = uuid.decode()
        return index, str(uuid)
    except Exception:
        return None, None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
