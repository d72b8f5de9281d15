"""docker-compose.yml, deploy/Dockerfile and deploy/kuberay/, checked without a Docker engine or a Kubernetes cluster.

- every ``IGAT_*`` variable they set is a setting the service or its client reads (Settings ignores unknown
  ones, so a typo would pass silently);
- every container that touches runs mounts the artifacts volume at its ``IGAT_ARTIFACT_ROOT``, the same path
  everywhere, and the GPU worker asks for the GPUs;
- every flag in their commands is one the command accepts (from the command's own ``--help``);
- the image pins the torch and torchvision of pyproject.toml, and deploy/env.example documents every variable
  compose reads (and has a line for each it requires);
- what is exposed (deploy/README.md, "Exposure"): compose publishes ports on 127.0.0.1 only, the API needs the
  token for reads (IGAT_OPEN_READS=false), Ray runs with token authentication on every Ray container and on its one
  client (the dispatcher) and nowhere else, compose's networks and KubeRay's NetworkPolicies let only the right
  pods reach Ray and PostgreSQL; each check is also run on broken copies of the files, which it must refuse;
- a private Ray head started with compose's Ray environment refuses the Jobs API without the token and serves the
  dispatcher's environment;
- the compose services' own commands (migrate, api, dispatcher), run as processes on this machine against
  PostgreSQL and the shared local Ray head, take an experiment from ``POST /experiments`` to its results.
"""

from __future__ import annotations

import copy
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
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


def manifests() -> list[dict]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


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
    assert required == {"POSTGRES_PASSWORD", "IGAT_API_TOKEN", "RAY_AUTH_TOKEN"}
    assert required <= example


# ------------------------------------------------------------------------------------------------------ exposure
# Each check returns the problems it finds, so that it can be run on the real files (none) and on broken copies
# of them (the problem the break introduces).

LOOPBACK = "127.0.0.1"
RAY_TOKEN_FROM_ENV_FILE = "${RAY_AUTH_TOKEN:?"
SECRETS_OF_THE_SERVICE = {"IGAT_DATABASE_URL", "IGAT_API_TOKEN", "POSTGRES_PASSWORD"}


def command_argv(service: dict) -> list[str]:
    return argv_of(service["command"]) if "command" in service else []


def runs_api(argv: list[str]) -> bool:
    return argv[:2] == ["uvicorn", "service.main:app"]


def runs_ray_node(argv: list[str]) -> bool:
    return argv[:2] == ["ray", "start"]


def runs_dispatcher(argv: list[str]) -> bool:
    return "service.dispatcher" in argv


def published_host_ip(entry: str | dict) -> str | None:
    """The host address of a compose ``ports:`` entry (its defaults filled in); None: every interface."""
    if isinstance(entry, dict):
        return entry.get("host_ip")
    parts = interpolated(str(entry)).split(":")
    return parts[0] if len(parts) == 3 else None


def networks_of(service: dict) -> set[str]:
    return set(service.get("networks") or ["default"])


def compose_exposure_problems(doc: dict) -> list[str]:
    services = doc["services"]
    problems = []
    for name, service in services.items():
        for entry in service.get("ports", []):
            if published_host_ip(entry) != LOOPBACK:
                problems.append(f"{name}: port {entry!r} is published beyond {LOOPBACK}")
    if services["postgres"].get("ports"):
        problems.append("postgres: publishes a port")
    for name, service in services.items():
        argv, env = command_argv(service), service.get("environment", {})
        if (runs_api(argv) or "IGAT_OPEN_READS" in env) and env.get("IGAT_OPEN_READS") != "false":
            problems.append(f"{name}: IGAT_OPEN_READS is {env.get('IGAT_OPEN_READS')!r}, not 'false'")
        if runs_ray_node(argv) or runs_dispatcher(argv):
            if env.get("RAY_AUTH_MODE") != "token":
                problems.append(f"{name}: RAY_AUTH_MODE is {env.get('RAY_AUTH_MODE')!r}, not 'token'")
            if not str(env.get("RAY_AUTH_TOKEN", "")).startswith(RAY_TOKEN_FROM_ENV_FILE):
                problems.append(f"{name}: RAY_AUTH_TOKEN is not required from .env")
        elif "RAY_AUTH_TOKEN" in env:
            problems.append(f"{name}: holds the Ray token but does not talk to Ray")
        if runs_ray_node(argv) and SECRETS_OF_THE_SERVICE & set(env):
            problems.append(f"{name}: a Ray node holds {sorted(SECRETS_OF_THE_SERVICE & set(env))}")
        if "--head" in argv and "RAY_AUTH_TOKEN" not in str(service.get("healthcheck", {}).get("test")):
            problems.append(f"{name}: the healthcheck does not send the Ray token")
    ray_networks = set().union(*(networks_of(s) for s in services.values() if runs_ray_node(command_argv(s))))
    for name, service in services.items():
        argv, env = command_argv(service), service.get("environment", {})
        if name != "postgres" and "IGAT_DATABASE_URL" not in env and networks_of(service) & networks_of(
                services["postgres"]):
            problems.append(f"{name}: shares a network with postgres without using the database")
        if not (runs_ray_node(argv) or runs_dispatcher(argv)) and networks_of(service) & ray_networks:
            problems.append(f"{name}: shares a network with the Ray nodes without talking to Ray")
    return problems


def test_the_image_needs_the_token_for_reads():
    """A bare `docker run` of the image is a deployment too (its `igat serve` listens on 0.0.0.0)."""
    assert re.search(r"^\s*IGAT_OPEN_READS=false\b", DOCKERFILE.read_text(), re.MULTILINE)


def undocumented_variables(compose_text: str, env_example_text: str) -> set[str]:
    """Variables compose interpolates that deploy/env.example neither sets nor names in a commented-out line."""
    documented = set(re.findall(r"^#?\s*(\w+)=", env_example_text, re.MULTILINE))
    return set(re.findall(r"\$\{(\w+)", compose_text)) - documented


def _set(path: str, value: object) -> Callable[[dict], None]:
    """A mutation setting the entry at ``path`` (keys joined by "/"); None deletes it."""
    *parents, last = path.split("/")

    def mutate(doc: dict) -> None:
        node = doc
        for key in parents:
            node = node[key]
        if value is None:
            del node[last]
        else:
            node[last] = value
    return mutate


COMPOSE_BREAKS = {
    "api published on every interface": (_set("services/api/ports", ["8000:8000"]), "api: port"),
    "api bound to 0.0.0.0 by default": (_set("services/api/ports", ["${IGAT_API_BIND:-0.0.0.0}:8000:8000"]),
                                        "api: port"),
    "dashboard on every interface": (_set("services/ray-head/ports", ["8265:8265"]), "ray-head: port"),
    "postgres published": (_set("services/postgres/ports", ["127.0.0.1:5432:5432"]), "postgres: publishes"),
    "open reads unset": (_set("services/api/environment/IGAT_OPEN_READS", None), "api: IGAT_OPEN_READS"),
    "open reads on": (_set("services/api/environment/IGAT_OPEN_READS", "true"), "api: IGAT_OPEN_READS"),
    "open reads on the dispatcher": (_set("services/dispatcher/environment/IGAT_OPEN_READS", "true"),
                                     "dispatcher: IGAT_OPEN_READS"),
    "worker without auth": (_set("services/ray-gpu-worker/environment/RAY_AUTH_MODE", None),
                            "ray-gpu-worker: RAY_AUTH_MODE"),
    "head auth disabled": (_set("services/ray-head/environment/RAY_AUTH_MODE", "disabled"),
                           "ray-head: RAY_AUTH_MODE"),
    "dispatcher without the token": (_set("services/dispatcher/environment/RAY_AUTH_TOKEN", None),
                                     "dispatcher: RAY_AUTH_TOKEN"),
    "a default Ray token": (_set("services/ray-head/environment/RAY_AUTH_TOKEN", "${RAY_AUTH_TOKEN:-igat}"),
                            "ray-head: RAY_AUTH_TOKEN"),
    "the API holds the Ray token": (_set("services/api/environment/RAY_AUTH_TOKEN", "${RAY_AUTH_TOKEN:?x}"),
                                    "api: holds the Ray token"),
    "the head holds the database password": (
        _set("services/ray-head/environment/IGAT_DATABASE_URL", "postgresql+psycopg://igat:${POSTGRES_PASSWORD:?x}@db"),
        "ray-head: a Ray node holds"),
    "healthcheck without the token": (
        _set("services/ray-head/healthcheck/test", ["CMD", "curl", "-f", "http://127.0.0.1:8265/api/version"]),
        "ray-head: the healthcheck"),
    "the API on the Ray network": (_set("services/api/networks", ["db", "ray"]), "api: shares a network with the Ray"),
    "the Ray head on the database network": (_set("services/ray-head/networks", ["db", "ray"]),
                                             "ray-head: shares a network with postgres"),
    "everything on the default network": (lambda doc: [s.pop("networks", None) for s in doc["services"].values()],
                                           "shares a network"),
}


def test_compose_exposes_nothing_beyond_what_deploy_readme_says():
    assert compose_exposure_problems(compose()) == []


def assert_refuses_a_broken_copy(check, original, break_) -> None:
    mutate, expected = break_
    broken = copy.deepcopy(original)
    mutate(broken)
    problems = check(broken)
    assert any(expected in problem for problem in problems), problems


@pytest.mark.parametrize("break_", COMPOSE_BREAKS.values(), ids=COMPOSE_BREAKS.keys())
def test_the_compose_exposure_check_refuses_a_broken_copy(break_):
    assert_refuses_a_broken_copy(compose_exposure_problems, compose(), break_)


def test_every_variable_compose_reads_is_documented_in_env_example():
    compose_text, example = COMPOSE.read_text(), ENV_EXAMPLE.read_text()
    assert {"IGAT_API_BIND", "RAY_AUTH_TOKEN"} <= set(re.findall(r"\$\{(\w+)", compose_text))
    assert undocumented_variables(compose_text, example) == set()
    for variable in ("IGAT_API_BIND", "RAY_AUTH_TOKEN", "IGAT_HEAD_CPUS"):
        lines = [line for line in example.splitlines() if not re.match(rf"#?\s*{variable}=", line)]
        assert undocumented_variables(compose_text, "\n".join(lines)) == {variable}


# KubeRay labels every pod of a RayCluster with these; the API, dispatcher and migration pods carry igat.yaml's
# `app` labels; an in-cluster PostgreSQL is expected to carry app=igat-postgres (deploy/README.md).
POSTGRES_LABELS = {"app": "igat-postgres"}
HEAD_PORTS = (6379, 8265, 10001, 52365, 8080)  # GCS, dashboard/Jobs API, Ray client, dashboard agent, metrics
WORKER_PORTS = (52365, 8080, 10002, 20000)  # dashboard agent, metrics, a worker port, an object manager port
JOBS_API_PORT = 8265


@dataclass(frozen=True)
class Pod:
    name: str
    labels: tuple[tuple[str, str], ...]
    in_namespace: bool = True

    @property
    def label_dict(self) -> dict[str, str]:
        return dict(self.labels)


def pod(name: str, labels: dict[str, str], in_namespace: bool = True) -> Pod:
    return Pod(name, tuple(sorted(labels.items())), in_namespace)


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) applied to ``labels``."""
    if any(labels.get(key) != value for key, value in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, values = expression["key"], expression.get("values", [])
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[expression["operator"]]
        if not ok:
            return False
    return True


def peer_admits(peer: dict, source: Pod) -> bool:
    """Whether a NetworkPolicy ``from`` entry admits ``source``; an ipBlock or a namespaceSelector may hold
    anything, so they count as admitting every pod their podSelector (if any) matches."""
    if "ipBlock" in peer or "namespaceSelector" in peer:
        return selects(peer.get("podSelector") or {}, source.label_dict)
    return source.in_namespace and selects(peer["podSelector"], source.label_dict)


def port_admits(entry: dict, port: int) -> bool:
    number = entry.get("port")
    if not isinstance(number, int):  # no port, or a named one: counts as any port
        return True
    return number <= port <= entry.get("endPort", number)


def reachable(policies: list[dict], target: Pod, source: Pod, port: int) -> bool:
    """Kubernetes' rule: a pod no ingress policy selects accepts everything; one that some select accepts what
    some rule of one of them allows."""
    selecting = [p["spec"] for p in policies if selects(p["spec"]["podSelector"], target.label_dict)
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    return any((not rule.get("from") or any(peer_admits(peer, source) for peer in rule["from"]))
               and (not rule.get("ports") or any(port_admits(entry, port) for entry in rule["ports"]))
               for spec in selecting for rule in spec.get("ingress") or [])


def igat_pods(docs: list[dict]) -> dict[str, Pod]:
    pods = {}
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            template = doc["spec"]["template"]
            for container in template["spec"]["containers"]:
                pods[container["name"]] = pod(container["name"], template.get("metadata", {}).get("labels", {}))
        if doc["kind"] == "RayCluster":
            cluster = doc["metadata"]["name"]
            for node_type in ("head", "worker"):
                pods[f"ray-{node_type}"] = pod(f"ray-{node_type}", {"ray.io/cluster": cluster,
                                                                    "ray.io/node-type": node_type})
    pods["postgres"] = pod("postgres", POSTGRES_LABELS)
    pods["another pod"] = pod("another pod", {"app": "something-else"})
    pods["outside"] = pod("outside", {}, in_namespace=False)
    return pods


def expected_reach(source: str, target: str, port: int) -> bool:
    """Who may reach whom (deploy/README.md, "Exposure")."""
    ray_pods = {"ray-head", "ray-worker"}
    if target in ray_pods:
        return source in ray_pods or (source == "dispatcher" and target == "ray-head" and port == JOBS_API_PORT)
    if target == "api":
        return port == 8000
    if target == "postgres":
        return source in {"api", "dispatcher", "migrate"} and port == 5432
    return False  # the dispatcher and the migration Job serve nothing


TARGET_PORTS = {"ray-head": HEAD_PORTS, "ray-worker": WORKER_PORTS, "api": (8000, 9000),
                "dispatcher": (8000, 8265), "postgres": (5432, 22)}


def k8s_env(entries: list[dict]) -> dict[str, dict]:
    return {entry["name"]: entry for entry in entries}


def manifest_exposure_problems(docs: list[dict]) -> list[str]:
    problems = []
    ray_envs: dict[str, dict[str, dict]] = {}
    others: dict[str, dict[str, dict]] = {}
    for doc in docs:
        if doc["kind"] == "RayCluster":
            spec = doc["spec"]
            groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
            for group, g in groups:
                for container in g["template"]["spec"]["containers"]:
                    ray_envs[f"{group} {container['name']}"] = k8s_env(container.get("env", []))
            if spec.get("enableInTreeAutoscaling"):
                ray_envs["autoscaler"] = k8s_env((spec.get("autoscalerOptions") or {}).get("env", []))
        else:
            for container in _containers_in(doc):
                env = k8s_env(container.get("env", []))
                (ray_envs if runs_dispatcher(container.get("command", [])) else others)[container["name"]] = env
                if runs_api(container.get("command", [])) or "IGAT_OPEN_READS" in env:
                    value = env.get("IGAT_OPEN_READS", {}).get("value")
                    if value != "false":
                        problems.append(f"{container['name']}: IGAT_OPEN_READS is {value!r}, not 'false'")
    token_sources = set()
    for where, env in ray_envs.items():
        if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
            problems.append(f"{where}: RAY_AUTH_MODE is not 'token'")
        reference = (env.get("RAY_AUTH_TOKEN", {}).get("valueFrom") or {}).get("secretKeyRef")
        if reference is None:
            problems.append(f"{where}: RAY_AUTH_TOKEN does not come from a Secret")
        else:
            token_sources.add((reference["name"], reference["key"]))
    if len(token_sources) > 1:
        problems.append(f"the Ray containers and the dispatcher read different tokens: {sorted(token_sources)}")
    problems += [f"{where}: holds the Ray token but does not talk to Ray" for where, env in others.items()
                 if "RAY_AUTH_TOKEN" in env]

    policies = [doc for doc in docs if doc["kind"] == "NetworkPolicy"]
    pods = igat_pods(docs)
    for target, ports in TARGET_PORTS.items():
        for source in pods:
            for port in ports:
                actual = reachable(policies, pods[target], pods[source], port)
                if source != target and actual != expected_reach(source, target, port):
                    problems.append(f"{source} -> {target}:{port} is {'open' if actual else 'closed'}")
    return problems


def _policy(name: str) -> Callable[[list[dict]], dict]:
    return lambda docs: next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == name)


def _container(name: str) -> Callable[[list[dict]], dict]:
    def find(docs: list[dict]) -> dict:
        for doc in docs:
            if doc["kind"] == "RayCluster":
                spec = doc["spec"]
                for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
                    for container in g["template"]["spec"]["containers"]:
                        if container["name"] == name:
                            return container
            for container in _containers_in(doc):
                if container["name"] == name:
                    return container
        raise KeyError(name)
    return find


def _drop_env(find: Callable[[list[dict]], dict], variable: str) -> Callable[[list[dict]], None]:
    def mutate(docs: list[dict]) -> None:
        container = find(docs)
        container["env"] = [e for e in container["env"] if e["name"] != variable]
    return mutate


def _set_env(find: Callable[[list[dict]], dict], variable: str, value: str) -> Callable[[list[dict]], None]:
    def mutate(docs: list[dict]) -> None:
        container = find(docs)
        container["env"] = [e for e in container["env"] if e["name"] != variable] + [{"name": variable,
                                                                                      "value": value}]
    return mutate


def _drop_policy(name: str) -> Callable[[list[dict]], None]:
    def mutate(docs: list[dict]) -> None:
        docs.remove(_policy(name)(docs))
    return mutate


def _drop_autoscaler_env(docs: list[dict]) -> None:
    next(d for d in docs if d["kind"] == "RayCluster")["spec"]["autoscalerOptions"].pop("env")


def _drop_all_policies(docs: list[dict]) -> None:
    docs[:] = [d for d in docs if d["kind"] != "NetworkPolicy"]


MANIFEST_BREAKS = {
    "open reads unset on the API": (_drop_env(_container("api"), "IGAT_OPEN_READS"), "api: IGAT_OPEN_READS"),
    "open reads on": (_set_env(_container("api"), "IGAT_OPEN_READS", "true"), "api: IGAT_OPEN_READS"),
    "head without auth": (_drop_env(_container("ray-head"), "RAY_AUTH_MODE"), "head ray-head: RAY_AUTH_MODE"),
    "worker auth disabled": (_set_env(_container("ray-worker"), "RAY_AUTH_MODE", "disabled"),
                             "gpu ray-worker: RAY_AUTH_MODE"),
    "worker token as a literal": (_set_env(_container("ray-worker"), "RAY_AUTH_TOKEN", "igat"),
                                  "gpu ray-worker: RAY_AUTH_TOKEN"),
    "dispatcher without the token": (_drop_env(_container("dispatcher"), "RAY_AUTH_TOKEN"),
                                     "dispatcher: RAY_AUTH_TOKEN"),
    "autoscaler without the token": (_drop_autoscaler_env, "autoscaler: RAY_AUTH_MODE"),
    "the API holds the Ray token": (
        lambda docs: _container("api")(docs)["env"].append(
            {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "igat", "key": "ray-auth-token"}}}),
        "api: holds the Ray token"),
    "no NetworkPolicy": (_drop_all_policies, "outside -> ray-head:8265 is open"),
    "no Jobs API policy": (_drop_policy("igat-ray-jobs-api"), "dispatcher -> ray-head:8265 is closed"),
    "Jobs API open to every pod": (lambda docs: _policy("igat-ray-jobs-api")(docs)["spec"]["ingress"][0].pop("from"),
                                   "api -> ray-head:8265 is open"),
    "dispatcher reaches GCS": (lambda docs: _policy("igat-ray-jobs-api")(docs)["spec"]["ingress"][0].pop("ports"),
                               "dispatcher -> ray-head:6379 is open"),
    "Ray pods open to all": (lambda docs: _policy("igat-ray")(docs)["spec"]["ingress"][0].pop("from"),
                             "outside -> ray-worker:52365 is open"),
    "Ray pods open to another namespace": (
        lambda docs: _policy("igat-ray")(docs)["spec"]["ingress"][0]["from"].append({"namespaceSelector": {}}),
        "outside -> ray-head:6379 is open"),
    "API open on every port": (lambda docs: _policy("igat-api")(docs)["spec"]["ingress"][0].pop("ports"),
                               "outside -> api:9000 is open"),
    "no API policy": (_drop_policy("igat-api"), "outside -> api:9000 is open"),
    "the API unreachable": (lambda docs: _policy("igat-api")(docs)["spec"].pop("ingress"),
                            "outside -> api:8000 is closed"),
    "no dispatcher policy": (_drop_policy("igat-dispatcher"), "outside -> dispatcher:8000 is open"),
    "no PostgreSQL policy": (_drop_policy("igat-postgres"), "ray-head -> postgres:5432 is open"),
    "PostgreSQL open to the Ray pods": (
        lambda docs: _policy("igat-postgres")(docs)["spec"]["ingress"][0]["from"].append(
            {"podSelector": {"matchLabels": {"ray.io/cluster": "igat"}}}),
        "ray-worker -> postgres:5432 is open"),
    "migration pods unlabelled": (
        lambda docs: next(d for d in docs if d["kind"] == "Job")["spec"]["template"].pop("metadata"),
        "migrate -> postgres:5432 is closed"),
}


def test_the_kuberay_manifests_expose_nothing_beyond_what_deploy_readme_says():
    docs = manifests()
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "NetworkPolicy"} >= {
        "igat-ray", "igat-ray-jobs-api", "igat-api", "igat-dispatcher", "igat-postgres"}
    assert manifest_exposure_problems(docs) == []


@pytest.mark.parametrize("break_", MANIFEST_BREAKS.values(), ids=MANIFEST_BREAKS.keys())
def test_the_kuberay_exposure_check_refuses_a_broken_copy(break_):
    assert_refuses_a_broken_copy(manifest_exposure_problems, manifests(), break_)


def compose_ray_env(service: str, token: str) -> dict[str, str]:
    """The RAY_* variables compose gives ``service``, with ``token`` as .env's RAY_AUTH_TOKEN."""
    env = compose()["services"][service].get("environment", {})
    return {k: interpolated(str(v)).replace("<RAY_AUTH_TOKEN>", token) for k, v in env.items() if k.startswith("RAY_")}


LIST_JOBS = ("import sys; from ray.job_submission import JobSubmissionClient; "
             "JobSubmissionClient(sys.argv[1]).list_jobs()")


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_ray_head_with_the_compose_environment_refuses_the_jobs_api_without_its_token(tmp_path, monkeypatch):
    from workers.ray_cluster import start_local_head

    token = secrets.token_hex(32)
    # a head of its own: Ray's temp dir (short: its socket paths must fit in 107 bytes) and HOME (no ~/.ray token)
    private = Path(tempfile.mkdtemp(prefix="igat-rt-", dir="/tmp"))
    monkeypatch.setenv("RAY_TMPDIR", str(private))
    monkeypatch.setenv("HOME", str(private))
    for variable in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(variable, raising=False)
    bare_env = dict(os.environ)
    for variable, value in compose_ray_env("ray-head", token).items():
        monkeypatch.setenv(variable, value)
    head = start_local_head(num_cpus=1, log_path=tmp_path / "head.log", timeout=180)
    try:
        jobs = f"{head.dashboard_url}/api/jobs/"
        assert httpx.get(jobs, timeout=10).status_code == 401
        assert httpx.get(jobs, headers={"Authorization": "Bearer not-the-token"}, timeout=10).status_code == 403
        assert httpx.get(jobs, headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code == 200

        def client(service: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-c", LIST_JOBS, head.dashboard_url], capture_output=True,
                                  text=True, timeout=120, env={**bare_env, **compose_ray_env(service, token)})

        dispatcher = client("dispatcher")
        assert dispatcher.returncode == 0, dispatcher.stderr[-3000:]
        api = client("api")
        assert api.returncode != 0 and "Missing authentication token" in api.stderr, api.stderr[-3000:]

        port = head.dashboard_url.rsplit(":", 1)[1]
        healthcheck = [arg.replace(":8265/", f":{port}/") for arg in compose()["services"]["ray-head"]["healthcheck"]
                       ["test"][1:]]
        healthcheck[0] = sys.executable
        probe = subprocess.run(healthcheck, capture_output=True, text=True, timeout=60,
                               env={**bare_env, **compose_ray_env("ray-head", token)})
        assert probe.returncode == 0, probe.stderr[-3000:]
    finally:
        head.stop()
        shutil.rmtree(private, ignore_errors=True)


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
    from workers.ray_cluster import ray_auth_mode

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
        # the shared local head runs without Ray's token authentication (the private head of the test above has it)
        ray_overrides = {"dispatcher": {"RAY_AUTH_MODE": ray_auth_mode()}}
        for name, replacements in (("api", {"0.0.0.0": "127.0.0.1", "8000": str(port)}), ("dispatcher", {})):
            processes[name] = subprocess.Popen(
                service_argv(name, replacements), env=service_env(name, {**overrides, **ray_overrides.get(name, {})}),
                cwd=tmp_path,
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
        with httpx.Client(base_url=url, timeout=30, headers=AUTH) as client:  # compose: reads need the token too
            r = client.post("/experiments", json=spec)
            assert r.status_code == 202, r.text
            experiment_id = r.json()["id"]

            def finished() -> dict | None:
                assert processes["dispatcher"].poll() is None, logs["dispatcher"].read_text()
                d = client.get(f"/experiments/{experiment_id}").json()
                return d if d["status"] in ("succeeded", "failed", "cancelled") else None

            final = wait_for(finished, 420, interval=1.0, what="the experiment to finish")
            assert final["status"] == "succeeded", final.get("error")
            assert httpx.get(f"{url}/results/{experiment_id}", timeout=30).status_code == 401
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
