"""Rank identity from torchrun / Slurm environments and the Megatron-style layout helper."""

from __future__ import annotations

import socket

import pytest

from rankwatch.exporters.identity import RankIdentity, megatron_layout


def test_torchrun_environment() -> None:
    env = {"RANK": "13", "LOCAL_RANK": "5", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8",
           "TORCHELASTIC_RESTART_COUNT": "2", "SLURM_PROCID": "1", "SLURMD_NODENAME": "p5-dy-gpu-2"}
    ident = RankIdentity.from_env(env)
    # srun starting one torchrun per node sets SLURM_PROCID to the node index: torchrun wins.
    assert (ident.rank, ident.local_rank, ident.world_size, ident.local_world_size) == (13, 5, 16, 8)
    assert ident.restart_count == 2 and ident.node == "p5-dy-gpu-2"


def test_srun_one_task_per_gpu_environment() -> None:
    env = {"SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8(x2)",
           "SLURMD_NODENAME": "queue1-st-p5-2", "SLURM_RESTART_COUNT": "1"}
    ident = RankIdentity.from_env(env)
    assert (ident.rank, ident.local_rank, ident.world_size, ident.local_world_size) == (9, 1, 16, 8)
    assert ident.node == "queue1-st-p5-2" and ident.restart_count == 1


def test_defaults_and_node_sources() -> None:
    ident = RankIdentity.from_env({})
    assert (ident.rank, ident.local_rank, ident.world_size) == (0, 0, 1)
    assert ident.node == socket.gethostname()
    assert ident.gpu is None and ident.gpu_uuid is None and ident.pp is None
    assert RankIdentity.from_env({"NODE_NAME": "k8s-node-7"}).node == "k8s-node-7"
    assert RankIdentity.from_env({"NODE_NAME": "k8s", "RANKWATCH_NODE": "explicit"}).node == "explicit"


def test_malformed_variables_fail_at_startup_with_the_variable_named() -> None:
    with pytest.raises(ValueError, match="LOCAL_RANK='x'"):
        RankIdentity.from_env({"LOCAL_RANK": "x"})
    with pytest.raises(ValueError, match="outside world"):
        RankIdentity.from_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_gpu_from_cuda_visible_devices_without_a_driver() -> None:
    # No NVML here: the physical index (or UUID) is the CUDA_VISIBLE_DEVICES entry of the rank.
    env = {"LOCAL_RANK": "2", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    assert RankIdentity.from_env(env).gpu == 6
    uuids = {"LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "GPU-aaaa,GPU-bbbb"}
    ident = RankIdentity.from_env(uuids)
    assert ident.gpu is None and ident.gpu_uuid == "GPU-bbbb"
    # One visible device per rank (Slurm --gpus-per-task=1): it is that device whatever LOCAL_RANK.
    assert RankIdentity.from_env({"LOCAL_RANK": "3", "CUDA_VISIBLE_DEVICES": "3"}).gpu == 3
    assert RankIdentity.from_env({"LOCAL_RANK": "0", "CUDA_VISIBLE_DEVICES": ""}).gpu is None


def test_megatron_layout_tp_innermost_pp_outermost() -> None:
    # 16 ranks, tp=2, cp=2, pp=2 -> dp=2.  rank = tp + 2*(cp + 2*(dp + 2*pp))
    lay = megatron_layout(1, 16, tp_size=2, cp_size=2, pp_size=2)
    assert (lay.tp, lay.cp, lay.dp, lay.pp) == (1, 0, 0, 0)
    lay = megatron_layout(13, 16, tp_size=2, cp_size=2, pp_size=2)
    assert (lay.tp, lay.cp, lay.dp, lay.pp) == (1, 0, 1, 1)
    lay = megatron_layout(6, 16, tp_size=2, cp_size=2, pp_size=2)
    assert (lay.tp, lay.cp, lay.dp, lay.pp) == (0, 1, 1, 0)
    coords = {tuple(vars(megatron_layout(r, 16, tp_size=2, cp_size=2, pp_size=2)).values()) for r in range(16)}
    assert len(coords) == 16  # a bijection
    # The reference case: 256 GPUs, tp=8 (one node), pp=4 -> dp=8; a node's 8 GPUs are one TP group.
    node3 = [megatron_layout(r, 256, tp_size=8, pp_size=4) for r in range(24, 32)]
    assert {x.tp for x in node3} == set(range(8)) and {(x.dp, x.pp) for x in node3} == {(3, 0)}
    assert megatron_layout(255, 256, tp_size=8, pp_size=4).pp == 3
    with pytest.raises(ValueError, match="multiple"):
        megatron_layout(0, 12, tp_size=8)


def test_layout_from_environment_sizes() -> None:
    env = {"RANK": "13", "WORLD_SIZE": "16", "RANKWATCH_TP_SIZE": "2", "RANKWATCH_CP_SIZE": "2",
           "RANKWATCH_PP_SIZE": "2"}
    ident = RankIdentity.from_env(env)
    assert (ident.tp, ident.cp, ident.dp, ident.pp) == (1, 0, 1, 1)
    ident = RankIdentity.from_env({"RANK": "5", "WORLD_SIZE": "8"}, tp_size=4)
    assert (ident.tp, ident.dp, ident.pp, ident.cp) == (1, 1, 0, 0)
    labels = ident.info_labels()
    assert labels["tp"] == "1" and labels["gpu"] == ""
