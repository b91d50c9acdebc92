"""The shipped cluster manifests (jobs/clusters/): Ray's own launcher schema for aws/gcp, and for
the KubeRay RayJobs: the entrypoint is one of our commands (parsed by the real `mplug` parser,
configs that exist) and asks for resources its cluster can give."""

from __future__ import annotations

import copy
import math
import re
import shlex
from pathlib import Path

import pytest
import yaml

from jobs.submission import parse_mplug_command
from jobs.train_cmd import config_from_args

pytestmark = pytest.mark.unit

CLUSTERS = Path(__file__).resolve().parents[2] / "jobs" / "clusters"
LAUNCHER = ["aws.yaml", "gcp.yaml"]
RAYJOBS = ["kuberay/rayjob-pretrain.yaml", "kuberay/rayjob-tune.yaml"]


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTERS / name).read_text())


def reference_job(config: str):
    """A shipped job config, as `mplug pretrain --config NAME` reads it."""
    return config_from_args(parse_mplug_command(["pretrain", "--config", config]))


# ---- Ray's cluster launcher (ray up) -----------------------------------------------------------------
@pytest.fixture(params=LAUNCHER)
def launcher(request) -> tuple[dict, dict]:
    """(the YAML as written, as Ray prepares it for `ray up`, validated by its schema)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load(request.param)
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return raw, prepared


def _groups(cfg: dict) -> tuple[dict, dict, dict]:
    """(head, CPU group, GPU group) node types."""
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    cpu = [t for t in workers if not t["resources"].get("GPU")]
    gpu = [t for t in workers if t["resources"].get("GPU")]
    assert len(cpu) == 1 and len(gpu) == 1, "one CPU (ingest) group and one GPU (training) group"
    return head, cpu[0], gpu[0]


def test_launcher_groups_autoscale_from_zero_and_hold_pretrain_base(launcher):
    _, cfg = launcher
    head, cpu, gpu = _groups(cfg)
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    for group in (cpu, gpu):
        assert group["min_workers"] == 0 < group["max_workers"]
    assert cfg["max_workers"] >= cpu["max_workers"] + gpu["max_workers"]  # the global cap binds neither
    assert cpu["resources"]["CPU"] > 0
    assert gpu["resources"]["GPU"] == 8 and "gpu" in gpu["docker"]["worker_image"]
    job = reference_job("pretrain_base")
    workers = job.scaling.num_workers
    per_node = min(gpu["resources"]["GPU"], gpu["resources"]["CPU"] // job.scaling.cpus_per_worker)
    assert math.ceil(workers / per_node) <= gpu["max_workers"]


def test_launcher_installs_the_project_and_turns_token_auth_on(launcher):
    raw, cfg = launcher
    mounts = raw["file_mounts"]
    checkout = next(remote for remote, local in mounts.items() if local == ".")
    assert mounts.get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert any(f"pip install -q -e {checkout}" in c for c in raw["setup_commands"])
    # setup_commands reach every node (Ray merges them into head and worker setup).
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any(checkout in c for c in cfg[key])
    assert ".gitignore" in raw["rsync_filter"] and any(".git" in p for p in raw["rsync_exclude"])
    starts = [
        c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c
    ]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in starts)
    head_start = next(c for c in cfg["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start


# ---- KubeRay ----------------------------------------------------------------------------------------------
def _gpu_group(cluster_spec: dict) -> dict:
    groups = [g for g in cluster_spec["workerGroupSpecs"] if _pod_resources(g)[1] > 0]
    assert len(groups) == 1
    return groups[0]


def _pod_resources(group: dict) -> tuple[float, int]:
    """(CPUs, GPUs) one pod of a group gives Ray: num-cpus if set, else the container's limit."""
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    cpus = float(group.get("rayStartParams", {}).get("num-cpus", limits["cpu"]))
    return cpus, int(limits.get("nvidia.com/gpu", 0))


def _check_cluster_spec(spec: dict) -> None:
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2"
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    kinds = {"cpu": 0, "gpu": 0}
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        kinds["gpu" if _pod_resources(group)[1] else "cpu"] += 1
    assert kinds == {"cpu": 1, "gpu": 1}


def test_raycluster_autoscales_cpu_and_gpu_groups_with_token_auth():
    doc = load("kuberay/raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    _check_cluster_spec(doc["spec"])
    gpu = _gpu_group(doc["spec"])
    job = reference_job("pretrain_base")
    cpus, gpus = _pod_resources(gpu)
    per_pod = min(gpus, cpus // job.scaling.cpus_per_worker)
    assert math.ceil(job.scaling.num_workers / per_pod) <= gpu["maxReplicas"]


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjob_runs_our_command_with_resources_its_cluster_gives(name):
    doc = load(name)
    spec = doc["spec"]
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    assert spec["shutdownAfterJobFinishes"] is True and "rayClusterSpec" in spec
    _check_cluster_spec(spec["rayClusterSpec"])
    words = shlex.split(spec["entrypoint"])
    assert words[0] == "mplug"
    args = parse_mplug_command(words[1:])  # the real parser; --config/--space must exist
    job = config_from_args(args)  # the config the job runs, flags applied
    gpu = _gpu_group(spec["rayClusterSpec"])
    cpus, gpus = _pod_resources(gpu)
    workers = (
        job.scaling.num_workers if isinstance(job.scaling.num_workers, int) else job.scaling.num_workers[1]
    )
    assert job.scaling.use_gpu, "GPU training on the GPU group"
    per_pod = int(min(gpus, cpus // job.scaling.cpus_per_worker))
    assert per_pod >= 1, (
        f"a pod ({cpus:g} CPU, {gpus} GPU) holds no worker of {job.scaling.cpus_per_worker:g} CPU"
    )
    pods_per_run = math.ceil(workers / per_pod)
    concurrent = getattr(args, "max_concurrent", None) or 1
    assert pods_per_run * concurrent <= gpu["maxReplicas"], "the GPU group's maxReplicas holds the job"
    if gpu["minReplicas"] < pods_per_run:  # starts smaller than the job: the capacity check must be off
        assert args.autoscaling, "an autoscaling cluster's command needs --autoscaling"
        if args.command == "tune":
            assert args.max_concurrent, "on a cluster that starts empty, tune needs --max-concurrent"


# ---- the worker ranges docs/clusters.md tells users to pass -------------------------------------------
DOCS = CLUSTERS.parents[1] / "docs" / "clusters.md"
ELASTIC = ["aws.yaml", "gcp.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob-pretrain.yaml"]
# | `aws.yaml` | `gpu_train` | 0..2 | 8 | `--num-workers 8,16` |
_RANGE_ROW = re.compile(
    r"^\| `(?P<file>[^`]+)` \| `(?P<group>[^`]+)` \| (?P<lo>\d+)\.\.(?P<hi>\d+) \| (?P<gpus>\d+) \| "
    r"`--num-workers (?P<min>\d+),(?P<max>\d+)` \|",
    re.MULTILINE,
)


def documented_ranges() -> dict[str, dict]:
    rows = {m["file"]: m.groupdict() for m in _RANGE_ROW.finditer(DOCS.read_text())}
    return {
        f: {k: (v if k in ("file", "group") else int(v)) for k, v in row.items()} for f, row in rows.items()
    }


def training_group(name: str) -> tuple[str, int, int, int, float]:
    """(name, min nodes, max nodes, GPUs per node, CPUs per node) of a manifest's GPU group."""
    doc = load(name)
    if name in LAUNCHER:
        types = doc["available_node_types"]
        group = next(g for g, t in types.items() if t["resources"].get("GPU"))
        t = types[group]
        return group, t["min_workers"], t["max_workers"], t["resources"]["GPU"], t["resources"]["CPU"]
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    g = _gpu_group(spec)
    cpus, gpus = _pod_resources(g)
    return g["groupName"], g["minReplicas"], g["maxReplicas"], gpus, cpus


def test_documented_elastic_ranges_are_the_manifests_node_type_ranges():
    """docs/clusters.md's table names, for each manifest, the training group's node range and the
    `--num-workers MIN,MAX` that spans it: MIN what one node holds (training starts on the first
    node and survives losing all but one), MAX what all of them hold."""
    ranges = documented_ranges()
    assert sorted(ranges) == sorted(ELASTIC), f"docs/clusters.md lists {sorted(ranges)}"
    cpus_per_worker = reference_job("pretrain_base").scaling.cpus_per_worker
    for name, row in ranges.items():
        group, lo, hi, gpus, cpus = training_group(name)
        assert (row["group"], row["lo"], row["hi"], row["gpus"]) == (group, lo, hi, gpus), (name, row)
        per_node = int(min(gpus, cpus // cpus_per_worker))
        assert (row["min"], row["max"]) == (per_node, per_node * hi), (name, row, per_node)
    # The RayJob runs exactly that range.
    entrypoint = shlex.split(load("kuberay/rayjob-pretrain.yaml")["spec"]["entrypoint"])
    job = config_from_args(parse_mplug_command(entrypoint[1:]))
    row = ranges["kuberay/rayjob-pretrain.yaml"]
    assert tuple(job.scaling.num_workers) == (row["min"], row["max"])


def test_tune_on_an_autoscaling_cluster_needs_max_concurrent(capsys):
    from jobs.cli import main

    code = main(
        ["tune", "--task", "retrieval", "--config", "finetune_retrieval_tiny", "--space", "tune_tiny",
         "--data", "s3://b/p", "--eval-data", "s3://b/p", "--init", "s3://b/r/final", "--storage", "s3://b/t",
         "--name", "search", "--autoscaling"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--max-concurrent" in err and len(err.strip().splitlines()) == 1, err
