"""The job's shape from the SageMaker contract, sharding, and the GPU fail-fast (no GPU needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dogbreed import contract, distributed, train


def _paths(tmp_path: Path, resource: dict | None = None) -> contract.Paths:
    paths = contract.Paths.from_env({contract.BASE_DIR_ENV: str(tmp_path)})
    if resource is not None:
        paths.input_config_dir.mkdir(parents=True)
        paths.resource_config_file.write_text(json.dumps(resource))
    return paths


def test_one_host_without_config_is_one_process(tmp_path):
    plan = distributed.plan_world(_paths(tmp_path), env={})
    assert (plan.world_size, plan.node_rank, plan.backend) == (1, 0, "gloo")
    assert plan.master_addr == "127.0.0.1" and plan.socket_ifname == "lo"


def _option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_nproc_per_host_starts_cpu_ranks_on_the_loopback(tmp_path):
    plan = distributed.plan_world(_paths(tmp_path), env={contract.NPROC_PER_HOST_ENV: "2"})
    assert plan.world_size == 2 and plan.backend == "gloo" and plan.master_port > 0
    args = plan.torchrun_args(["--epochs", "3"])
    assert [_option(args, o) for o in ("--nnodes", "--nproc-per-node", "--node-rank", "--master-addr")] == [
        "1", "2", "0", "127.0.0.1"]
    assert _option(args, "--master-port") == str(plan.master_port) and _option(args, "--max-restarts") == "0"
    assert args[-4:] == ["--module", distributed.RANK_MODULE, "--epochs", "3"]
    env = plan.launch_env(cpu_count=8)
    assert env["GLOO_SOCKET_IFNAME"] == "lo" and env["OMP_NUM_THREADS"] == "4"  # the cores, shared
    assert plan.launch_env(cpu_count=1)["OMP_NUM_THREADS"] == "1"


def test_torchrun_reads_our_command_line_as_sagemaker_starts_it(tmp_path):
    """torchrun's own parser takes what the plan writes, as SageMaker's toolkit passes it
    (--nnodes, --nproc_per_node, --master_addr, --master_port, --node_rank)."""
    from torch.distributed.run import parse_args

    paths = _paths(tmp_path, {"current_host": "algo-2", "hosts": ["algo-1", "algo-2"]})
    plan = distributed.plan_world(paths, env={contract.NPROC_PER_HOST_ENV: "3"})
    args = parse_args(plan.torchrun_args(["--lr", "0.1"]))
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "3", 1)
    assert (args.master_addr, args.master_port, args.max_restarts) == ("algo-1", 29500, 0)
    assert args.module and args.training_script == distributed.RANK_MODULE
    assert args.training_script_args == ["--lr", "0.1"]


def test_multi_host_ranks_follow_sm_hosts_and_rendezvous_on_the_first(tmp_path):
    paths = _paths(tmp_path, {"current_host": "algo-2", "hosts": ["algo-1", "algo-2"],
                              "network_interface_name": "eth0"})
    plan = distributed.plan_world(paths, env={contract.MASTER_PORT_ENV: "29611"})
    assert (plan.world_size, plan.node_rank, plan.master_addr, plan.master_port) == (2, 1, "algo-1", 29611)
    assert _option(plan.torchrun_args([]), "--node-rank") == "1"
    assert plan.launch_env()["NCCL_SOCKET_IFNAME"] == "eth0"
    # The toolkit's SM_* variables win over the file.
    env = {contract.SM_HOSTS: '["algo-1", "algo-2", "algo-3"]', contract.SM_CURRENT_HOST: "algo-3",
           contract.NPROC_PER_HOST_ENV: "2"}
    plan = distributed.plan_world(paths, env=env)
    assert (plan.world_size, plan.node_rank) == (6, 2)
    assert _option(plan.torchrun_args([]), "--nnodes") == "3"
    assert plan.master_port == distributed.DEFAULT_MASTER_PORT


def test_bad_cluster_config_is_a_contract_error(tmp_path):
    paths = _paths(tmp_path, {"current_host": "algo-9", "hosts": ["algo-1", "algo-2"]})
    with pytest.raises(contract.ContractError, match="algo-9"):
        contract.cluster_hosts(paths, env={})
    with pytest.raises(contract.ContractError, match="SM_NUM_GPUS"):
        contract.num_gpus({contract.SM_NUM_GPUS: "many"})


def test_shards_cover_every_sample_once():
    batch = torch.arange(15)
    parts = [distributed.World(rank=r, size=4).shard_batch(batch) for r in range(4)]
    assert torch.equal(torch.cat(parts), batch) and {len(p) for p in parts} == {3, 4}
    ranges = [distributed.World(rank=r, size=3).shard_range(20) for r in range(3)]
    assert [i for r in ranges for i in r] == list(range(20))
    assert distributed.World().shard_batch(batch) is batch


def test_last_batch_too_small_for_every_rank_is_folded():
    gen = torch.Generator().manual_seed(0)
    sizes = [len(b) for b in train._batches(35, 16, gen, world_size=2)]
    assert sizes == [16, 19]  # a last batch of 3 would leave one rank a single sample
    assert sorted(torch.cat(train._batches(35, 16, gen, world_size=2)).tolist()) == list(range(35))
    sizes = [len(b) for b in train._batches(33, 16, torch.Generator().manual_seed(0))]
    assert sizes == [16, 17]  # one process: only a lone sample is folded, as before


def test_gpu_request_comes_from_sm_num_gpus_or_device_files(tmp_path):
    assert distributed.gpu_request({}, dev=tmp_path) is None
    # The images set NVIDIA_VISIBLE_DEVICES=all everywhere: alone it is no request.
    assert distributed.gpu_request({"NVIDIA_VISIBLE_DEVICES": "all"}, dev=tmp_path) is None
    assert distributed.gpu_request({contract.SM_NUM_GPUS: "8"}, dev=tmp_path) == "SM_NUM_GPUS=8"
    (tmp_path / "nvidia0").touch()
    (tmp_path / "nvidiactl").touch()
    assert distributed.gpu_request({"NVIDIA_VISIBLE_DEVICES": "0"}, dev=tmp_path) == (
        "/dev/nvidia0; NVIDIA_VISIBLE_DEVICES=0")


def test_unusable_gpu_names_driver_wheel_cuda_and_fix(tmp_path):
    (tmp_path / "nvidia0").touch()
    with pytest.raises(distributed.GpuUnusableError) as error:
        distributed.check_gpu({}, dev=tmp_path, cuda_available=lambda: False,
                              driver_version=lambda: "535.183.01")
    message = str(error.value)
    assert "GPU requested (/dev/nvidia0)" in message and "driver 535.183.01" in message
    assert f"built for CUDA {torch.version.cuda or 'none'}" in message and "Fix:" in message
    # Usable GPU, or none asked for: nothing to say.
    distributed.check_gpu({}, dev=tmp_path, cuda_available=lambda: True)
    distributed.check_gpu({}, dev=tmp_path / "none", cuda_available=lambda: False)


def test_driver_version_is_read_from_proc_text():
    text = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.183.01  Sun May 12 19:39:15 UTC 2024\n"
            "GCC version:  gcc version 10.2.1\n")
    assert distributed.parse_driver_version(text) == "535.183.01"
    assert distributed.parse_driver_version("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  "
                                            "580.65.06  Release Build\n") == "580.65.06"
