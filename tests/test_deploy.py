"""docker-compose.yml, deploy/Dockerfile and deploy/kuberay/, checked without a Docker engine or a Kubernetes cluster.

- every ``IGAT_*`` variable they set is a setting the service or its client reads (Settings ignores unknown
  ones, so a typo would pass silently);
- every container that touches runs mounts the artifacts volume at its ``IGAT_ARTIFACT_ROOT``, the same path
  everywhere, and the GPU worker asks for the GPUs;
- every flag in their commands is one the command accepts (from the command's own ``--help``);
- the image pins the torch and torchvision of pyproject.toml, and deploy/env.example names every variable
  compose requires;
- the compose services' own commands (migrate, api, dispatcher), run as processes on this machine against
  PostgreSQL and the shared local Ray head, take an experiment from ``POST /experiments`` to its results.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest
import yaml

from service.settings import Settings
from tests.service_fixtures import ROOT, TOKEN, free_port, pg_url, wait_for  # noqa: F401
from tests.test_ray_service import tiny_spec

COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
ENV_EXAMPLE = ROOT / "deploy" / "env.example"
MANIFESTS = sorted((ROOT / "deploy" / "kuberay").glob("*.yaml"))
CLIENT_VARIABLES = {"IGAT_API_URL", "IGAT_TOKEN_FILE"}
BIN = Path(sys.executable).parent
DEFAULTED = re.compile(r"\$\{(\w+):-([^}]*)\}")
REQUIRED = re.compile(r"\$\{(\w+):\?[^}]*\}")
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def igat_services() -> dict[str, dict]:
    """The compose services that run the igat image."""
    return {name: s for name, s in compose()["services"].items() if "igat" in str(s.get("image", ""))}


def manifest_containers() -> list[dict]:
    containers = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            containers += _containers_in(doc)
    return containers


def _containers_in(node) -> list[dict]:
    if isinstance(node, dict):
        found = [c for c in node.get("containers", []) if isinstance(c, dict)]
        return found + [c for value in node.values() for c in _containers_in(value)]
    if isinstance(node, list):
        return [c for value in node for c in _containers_in(value)]
    return []


def interpolated(text: str) -> str:
    """Compose's ``${VAR:-default}`` with its default, and a required ``${VAR:?message}`` as ``<VAR>``."""
    text = DEFAULTED.sub(lambda m: m.group(2), text)
    return REQUIRED.sub(lambda m: f"<{m.group(1)}>", text)


def argv_of(command: str | list[str]) -> list[str]:
    return shlex.split(interpolated(command)) if isinstance(command, str) else list(command)


def program_of(argv: list[str]) -> tuple[str, ...]:
    """The program (and subcommand) that ``argv`` runs: ``python -m X``, ``ray start``, ``igat migrate``,
    ``uvicorn``."""
    if argv[0] == "python":
        return tuple(argv[:3])
    return tuple(argv[:2]) if argv[0] in ("ray", "igat") else tuple(argv[:1])


def help_text(program: tuple[str, ...]) -> str:
    """The ``--help`` of ``program``."""
    base = [sys.executable, *program[1:]] if program[0] == "python" else [str(BIN / program[0]), *program[1:]]
    result = subprocess.run([*base, "--help"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, f"{base} --help failed:\n{result.stderr}"
    return result.stdout


def flags(argv: list[str]) -> list[str]:
    return [arg.split("=", 1)[0] for arg in argv if arg.startswith("--")]


# ------------------------------------------------------------------------------------------------ static checks


def test_compose_has_the_services_of_the_design():
    services = compose()["services"]
    assert {"postgres", "ray-head", "ray-gpu-worker", "api", "dispatcher", "migrate"} <= set(services)
    assert set(igat_services()) == {"ray-head", "ray-gpu-worker", "api", "dispatcher", "migrate"}
    for name in ("api", "dispatcher"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    devices = services["ray-gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "--num-gpus=0" in argv_of(services["ray-head"]["command"])


def test_every_igat_variable_set_by_the_deployment_is_a_setting():
    known = {f"IGAT_{name.upper()}" for name in Settings.model_fields} | CLIENT_VARIABLES
    set_by = {}
    for name, service in igat_services().items():
        for variable in service["environment"]:
            set_by.setdefault(variable, f"docker-compose.yml {name}")
    for container in manifest_containers():
        for entry in container.get("env", []):
            set_by.setdefault(entry["name"], f"deploy/kuberay {container['name']}")
    for line in DOCKERFILE.read_text().splitlines():
        set_by.update(dict.fromkeys(re.findall(r"\b(IGAT_\w+)=", line), "deploy/Dockerfile"))
    igat_variables = {v: where for v, where in set_by.items() if v.startswith("IGAT_")}
    assert len(igat_variables) >= 6
    unknown = {v: where for v, where in igat_variables.items() if v not in known}
    assert not unknown, f"variables no igat setting reads: {unknown}"


def test_every_container_that_touches_runs_mounts_the_artifacts_at_its_artifact_root():
    for name, service in igat_services().items():
        root = service["environment"]["IGAT_ARTIFACT_ROOT"]
        assert f"artifacts:{root}" in service["volumes"], name
    roots = set()
    for container in manifest_containers():
        if container["name"] == "migrate":
            continue
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
        assert mounts.get("artifacts") == env["IGAT_ARTIFACT_ROOT"], container["name"]
        roots.add(env["IGAT_ARTIFACT_ROOT"])
    assert len(roots) == 1
    assert {c["name"] for c in manifest_containers()} == {"ray-head", "ray-worker", "migrate", "api", "dispatcher"}


def test_every_flag_in_the_deployment_commands_is_accepted():
    commands = [argv_of(s["command"]) for s in igat_services().values()]
    commands += [c["command"] for c in manifest_containers() if "command" in c]
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc.get("kind") == "RayCluster":
                groups = [doc["spec"]["headGroupSpec"], *doc["spec"]["workerGroupSpecs"]]
                commands += [["ray", "start", *(f"--{key}" for key in g["rayStartParams"])] for g in groups]
    assert len(commands) >= 10
    helps: dict[tuple[str, ...], str] = {}
    for argv in commands:
        program = program_of(argv)
        if program not in helps:
            helps[program] = help_text(program)
        missing = [flag for flag in flags(argv) if not re.search(rf"(?<![\w-]){flag}(?![\w-])", helps[program])]
        assert not missing, f"{shlex.join(argv)}: {missing} not in its --help"


def test_the_image_pins_the_project_torch_and_every_required_variable_is_in_env_example():
    pins = dict(re.findall(r'"(torch|torchvision)==([\w.]+)"', (ROOT / "pyproject.toml").read_text()))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert {f"torch=={pins['torch']}", f"torchvision=={pins['torchvision']}"} <= set(project)
    args = dict(re.findall(r"ARG (TORCH_VERSION|TORCHVISION_VERSION)=(\S+)", DOCKERFILE.read_text()))
    assert args == {"TORCH_VERSION": pins["torch"], "TORCHVISION_VERSION": pins["torchvision"]}
    required = set(REQUIRED.findall(COMPOSE.read_text()))
    example = {line.split("=", 1)[0] for line in ENV_EXAMPLE.read_text().splitlines() if re.match(r"\w+=", line)}
    assert required == {"POSTGRES_PASSWORD", "IGAT_API_TOKEN"}
    assert required <= example


# ------------------------------------------------------------------------------------- the services as processes


def service_argv(name: str, replacements: dict[str, str]) -> list[str]:
    argv = argv_of(compose()["services"][name]["command"])
    argv = [replacements.get(arg, arg) for arg in argv]
    return [sys.executable if argv[0] == "python" else str(BIN / argv[0]), *argv[1:]]


def service_env(name: str, overrides: dict[str, str]) -> dict[str, str]:
    declared = compose()["services"][name]["environment"]
    env = {k: interpolated(str(v)) for k, v in declared.items()}
    assert set(overrides) <= set(env), "only variables compose sets are replaced"
    return {**os.environ, **env, **overrides}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(600)
def test_the_compose_services_take_an_experiment_to_its_results(ray_cluster, pg_url, tmp_path):  # noqa: F811
    port = free_port()
    overrides = {
        "IGAT_DATABASE_URL": pg_url,
        "IGAT_ARTIFACT_ROOT": str(tmp_path / "artifacts"),
        "IGAT_DATA_ROOT": str(tmp_path / "data"),
        "IGAT_RAY_ADDRESS": ray_cluster.dashboard_url,
        "IGAT_API_TOKEN": TOKEN,
    }
    migrate = subprocess.run(service_argv("migrate", {}), env=service_env("migrate", overrides), cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    assert "is at revision head" in migrate.stdout
    assert "postgresql" in migrate.stdout and "@" in migrate.stdout

    processes: dict[str, subprocess.Popen] = {}
    logs = {name: tmp_path / f"{name}.log" for name in ("api", "dispatcher")}
    try:
        for name, replacements in (("api", {"0.0.0.0": "127.0.0.1", "8000": str(port)}), ("dispatcher", {})):
            processes[name] = subprocess.Popen(
                service_argv(name, replacements), env=service_env(name, overrides), cwd=tmp_path,
                stdout=open(logs[name], "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            assert processes["api"].poll() is None, logs["api"].read_text()
            try:
                return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, 60, interval=0.3, what="the api service to answer /healthz")
        spec = tiny_spec("compose", pretrain_epochs=1, train_limit=256, tune=False)
        with httpx.Client(base_url=url, timeout=30) as client:
            r = client.post("/experiments", json=spec, headers=AUTH)
            assert r.status_code == 202, r.text
            experiment_id = r.json()["id"]

            def finished() -> dict | None:
                assert processes["dispatcher"].poll() is None, logs["dispatcher"].read_text()
                d = client.get(f"/experiments/{experiment_id}").json()
                return d if d["status"] in ("succeeded", "failed", "cancelled") else None

            final = wait_for(finished, 420, interval=1.0, what="the experiment to finish")
            assert final["status"] == "succeeded", final.get("error")
            results = client.get(f"/results/{experiment_id}").json()
            assert set(results["evaluation"]) >= {"base", "igat"}
            assert 0 <= results["evaluation"]["igat"]["average"]["pgd"] <= 100
            assert client.get(f"/results/{experiment_id}/artifacts/report.md").status_code == 200
        run_dir = tmp_path / "artifacts" / experiment_id
        assert (run_dir / "results.json").is_file() and (run_dir / "executor.json").is_file()
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
    for name, log in logs.items():
        assert "Traceback" not in log.read_text(), f"{name}:\n{log.read_text()[-4000:]}"
