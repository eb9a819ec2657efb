"""The example Kubernetes manifests in deploy/kubernetes/, checked without a cluster.

Every YAML document is parsed (``yaml.safe_load_all``) and its structure checked against what the app and the CLI
need: the migration Job runs ``hyperion-lock run --key migrate``, the init container waits with
``hyperion-lock wait`` on the same key and the same generation source, secrets come only from a Secret, the probes
hit ``/health`` on the container's port, and a pod that migrates in its own startup has a startupProbe long enough
for slow migrations. The CLI flags used in the manifests are checked against ``hyperion-lock <command> --help``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from hyperion_lock.cli.main import build_parser
from hyperion_lock.settings import validate_name
from tests.support import ROOT

MANIFESTS = ROOT / "deploy" / "kubernetes"
PLACEHOLDER = "release-REPLACE_ME"
VERSION_LABEL = "app.kubernetes.io/version"
MIN_MIGRATION_BUDGET_S = 600  # HYPERION_DEMO_MIGRATION_LOCK_TIMEOUT's default: a slow migration may take this long
# A label value: at most 63 characters, alphanumeric at both ends, '-', '_' and '.' inside.
LABEL_VALUE_RE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)?")
# A URL whose authority holds a password: scheme://[user]:password@host.
URL_RE = re.compile(r"\b(rediss?|postgres(?:ql)?(?:\+\w+)?)://([^\s'\"`<>]*)")

Doc = dict[str, Any]


# -- reading the manifests ------------------------------------------------------------------------------------
def yaml_files() -> list[Path]:
    return sorted(MANIFESTS.glob("*.yaml")) + sorted(MANIFESTS.glob("*.yml"))


@cache
def documents() -> tuple[tuple[str, Doc], ...]:
    """(file name, document) for every non-empty YAML document under deploy/kubernetes/."""
    found: list[tuple[str, Doc]] = []
    for path in yaml_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            assert isinstance(doc, dict), f"{path.name}: a document is not a mapping"
            found.append((path.name, doc))
    return tuple(found)


def of_kind(kind: str) -> list[Doc]:
    return [doc for _, doc in documents() if doc["kind"] == kind]


def only(kind: str) -> Doc:
    docs = of_kind(kind)
    assert len(docs) == 1, f"expected one {kind}, found {len(docs)}"
    return docs[0]


def workloads() -> list[Doc]:
    return of_kind("Job") + of_kind("Deployment")


def pod_template(workload: Doc) -> Doc:
    template: Doc = workload["spec"]["template"]
    return template


def pod_labels(workload: Doc) -> dict[str, str]:
    labels: dict[str, str] = pod_template(workload)["metadata"]["labels"]
    return labels


def containers(workload: Doc, *, init: bool = False) -> list[Doc]:
    spec = pod_template(workload)["spec"]
    found: list[Doc] = spec.get("initContainers" if init else "containers") or []
    return found


def all_containers(workload: Doc) -> list[Doc]:
    return containers(workload, init=True) + containers(workload)


def wait_containers(deployment: Doc) -> list[Doc]:
    return [c for c in containers(deployment, init=True) if c["command"][:2] == ["hyperion-lock", "wait"]]


def configmap_data(name: str) -> dict[str, str]:
    matching = [doc for doc in of_kind("ConfigMap") if doc["metadata"]["name"] == name]
    assert matching, f"no ConfigMap named {name!r} in deploy/kubernetes/"
    data: dict[str, str] = matching[0].get("data") or {}
    return data


def env_entries(container: Doc) -> dict[str, Doc]:
    """Each variable the container gets, as an env entry: ConfigMap keys (envFrom) first, then ``env`` wins."""
    entries: dict[str, Doc] = {}
    for source in container.get("envFrom") or []:
        assert set(source) <= {"configMapRef", "secretRef", "prefix"}, source
        if "configMapRef" in source:
            entries.update({k: {"name": k, "value": v}
                            for k, v in configmap_data(source["configMapRef"]["name"]).items()})
    for entry in container.get("env") or []:
        entries[entry["name"]] = entry
    return entries


def literal_env(container: Doc) -> dict[str, str]:
    return {name: str(e["value"]) for name, e in env_entries(container).items() if "value" in e}


def option(command: list[str], flag: str) -> str | None:
    """The value given to ``flag`` before any ``--``, or None."""
    head = command[:command.index("--")] if "--" in command else command
    for i, token in enumerate(head):
        if token == flag:
            return head[i + 1]
        if token.startswith(flag + "="):
            return token.split("=", 1)[1]
    return None


def flags(command: list[str]) -> list[str]:
    head = command[:command.index("--")] if "--" in command else command
    return [token.split("=", 1)[0] for token in head if token.startswith("-")]


@cache
def cli_help(command: str) -> str:
    out = subprocess.run([sys.executable, "-m", "hyperion_lock.cli.main", command, "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout


def probe_budget_s(probe: Doc) -> int:
    """How long a probe tolerates failures before acting: delay + failureThreshold x period (Kubernetes
    defaults: 0, 3, 10)."""
    return int(probe.get("initialDelaySeconds", 0)) + int(probe.get("failureThreshold", 3)) * int(
        probe.get("periodSeconds", 10))


def hyperion_lock_commands() -> list[list[str]]:
    return [c["command"] for w in workloads() for c in all_containers(w)
            if c.get("command", [])[:1] == ["hyperion-lock"]]


# -- the tests ------------------------------------------------------------------------------------------------
def test_every_document_parses_and_the_expected_kinds_are_there() -> None:
    assert yaml_files(), "deploy/kubernetes/ has no manifests"
    for name, doc in documents():
        assert doc.get("apiVersion") and doc.get("kind"), name
        assert doc["metadata"]["name"], name
    kinds = sorted(doc["kind"] for _, doc in documents())
    assert kinds == ["ConfigMap", "Deployment", "Deployment", "Job", "Service"], kinds
    assert not of_kind("Secret"), "no Secret is shipped: its values would be passwords"
    by_file = {name: doc for name, doc in documents()}
    readme = (MANIFESTS / "README.md").read_text()
    for name in by_file:
        assert f"`{name}`" in readme, f"{name} is not described in deploy/kubernetes/README.md"
    # The two Deployments are alternatives: one name, so switching variants is a plain apply.
    assert len({d["metadata"]["name"] for d in of_kind("Deployment")}) == 1


def test_the_job_runs_the_migration_once_through_hyperion_lock_run() -> None:
    job = only("Job")
    spec = job["spec"]
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 1
    assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] >= MIN_MIGRATION_BUDGET_S
    assert pod_template(job)["spec"]["restartPolicy"] in {"Never", "OnFailure"}
    [container] = containers(job)
    command: list[str] = container["command"]
    assert command[:2] == ["hyperion-lock", "run"], command
    assert option(command, "--key") == "migrate", command
    assert command[command.index("--") + 1:] == ["alembic", "upgrade", "head"], command
    # alembic finds alembic.ini (and through it migrations/) in the working directory: the image's /app.
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert container.get("workingDir", "/app") == "/app" and "WORKDIR /app" in dockerfile
    assert re.search(r"^COPY .*\balembic\.ini\b", dockerfile, re.MULTILINE)
    assert re.search(r"^COPY migrations\b", dockerfile, re.MULTILINE)
    # The key is the one the app's startup uses, so booting pods skip a migration the Job has done.
    app_source = (ROOT / "demo" / "app.py").read_text()
    assert '("migrate", jobs.migrate' in app_source


def test_the_init_container_waits_for_the_jobs_key_and_generation() -> None:
    job = only("Job")
    job_container = containers(job)[0]
    waiting = [d for d in of_kind("Deployment") if wait_containers(d)]
    assert len(waiting) == 1, "variant A: one Deployment whose pods wait for the Job"
    deployment = waiting[0]
    [init] = wait_containers(deployment)
    command: list[str] = init["command"]
    assert option(command, "--key") == option(job_container["command"], "--key") == "migrate"
    timeout = option(command, "--timeout")
    assert timeout is not None and 0 < float(timeout) <= MIN_MIGRATION_BUDGET_S, command
    # One generation source for the Job, the init container and the app (which then skips "migrate"): the same
    # env entry, no --generation flag that would override it, and the same label value on both pod templates.
    job_generation = env_entries(job_container)["HYPERION_LOCK_GENERATION"]
    field_path = job_generation["valueFrom"]["fieldRef"]["fieldPath"]  # the release's, not a literal in one file
    label = re.fullmatch(r"metadata\.labels\['([^']+)'\]", field_path)
    assert label and label.group(1) == VERSION_LABEL, field_path
    assert pod_labels(deployment)[VERSION_LABEL] == pod_labels(job)[VERSION_LABEL]
    for container in [job_container, *all_containers(deployment)]:
        assert option(container.get("command", []), "--generation") is None
        assert env_entries(container)["HYPERION_LOCK_GENERATION"] == job_generation, container["name"]
    # The same key prefix and the same image (so the same release's migrations) on both sides.
    prefix = literal_env(job_container).get("HYPERION_LOCK_KEY_PREFIX")
    assert literal_env(init).get("HYPERION_LOCK_KEY_PREFIX") == prefix
    assert {c["image"] for c in all_containers(deployment)} == {job_container["image"]}


def test_every_container_takes_redis_and_database_urls_from_a_secret() -> None:
    for workload in workloads():
        for container in all_containers(workload):
            entries = env_entries(container)
            needed = ["HYPERION_LOCK_REDIS_URL"]
            if container not in wait_containers(workload):  # `wait` never touches the database
                needed.append("DATABASE_URL")
            for name in needed:
                assert name in entries, f"{container['name']} has no {name}"
            for name in ("HYPERION_LOCK_REDIS_URL", "DATABASE_URL"):
                if name in entries:
                    ref = entries[name].get("valueFrom", {}).get("secretKeyRef")
                    assert ref and ref.get("name") and ref.get("key"), f"{container['name']}: {name} {entries[name]}"
            for name, value in literal_env(container).items():
                assert "://" not in value, f"{container['name']}: {name} is a literal URL"


def test_no_file_holds_a_url_with_a_password() -> None:
    files = [p for p in MANIFESTS.rglob("*") if p.is_file()]
    assert files
    for path in files:
        for match in URL_RE.finditer(path.read_text()):
            authority = match.group(2).split("/", 1)[0]
            assert not (":" in authority and "@" in authority), f"{path.name}: {match.group(0)}"
    for _, doc in documents():
        if doc["kind"] == "ConfigMap":
            assert not {"HYPERION_LOCK_REDIS_URL", "DATABASE_URL"} & set(doc.get("data") or {})


def test_the_url_scan_finds_passwords() -> None:
    """The check above would see a password: in redis and PostgreSQL URLs, with or without a user."""
    for text in ("redis://:pw@redis:6379/0", "rediss://app:pw@redis/1", "postgresql+psycopg://u:pw@db:5432/x"):
        match = URL_RE.search(f'value: "{text}"')
        assert match, text
        authority = match.group(2).split("/", 1)[0]
        assert ":" in authority and "@" in authority, text


@pytest.mark.parametrize("probe", ["startupProbe", "readinessProbe", "livenessProbe"])
def test_web_pods_are_probed_on_health_at_the_container_port(probe: str) -> None:
    for deployment in of_kind("Deployment"):
        [web] = containers(deployment)
        assert web["command"] == ["gunicorn", "-c", "gunicorn.conf.py"]
        env = literal_env(web)
        assert env.get("HOST") == "0.0.0.0"
        ports = {p["name"]: p["containerPort"] for p in web["ports"]}
        assert str(ports["http"]) == env.get("PORT", "8000")
        get = web[probe]["httpGet"]
        assert get["path"] == "/health"
        assert get["port"] in ports or get["port"] in ports.values(), get
        assert int(web[probe].get("timeoutSeconds", 1)) <= int(web[probe].get("periodSeconds", 10))


def test_the_service_selects_the_web_pods_only() -> None:
    service = only("Service")
    selector: dict[str, str] = service["spec"]["selector"]
    for deployment in of_kind("Deployment"):
        labels = pod_labels(deployment)
        assert selector.items() <= labels.items()
        match_labels: dict[str, str] = deployment["spec"]["selector"]["matchLabels"]
        assert match_labels.items() <= labels.items()
        assert VERSION_LABEL not in match_labels, "a Deployment's selector cannot change from release to release"
        [web] = containers(deployment)
        assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in web["ports"]}
    assert not selector.items() <= pod_labels(only("Job")).items()


def test_a_pod_that_migrates_itself_is_not_killed_by_liveness_during_a_slow_migration() -> None:
    migrating = [d for d in of_kind("Deployment") if not wait_containers(d)]
    assert len(migrating) == 1, "variant B: one Deployment whose pods migrate in their own startup"
    deployment = migrating[0]
    [web] = containers(deployment)
    budget = probe_budget_s(web["startupProbe"])
    assert budget >= MIN_MIGRATION_BUDGET_S, budget
    assert int(deployment["spec"].get("progressDeadlineSeconds", 600)) >= budget
    assert "initialDelaySeconds" not in web["livenessProbe"], "the startupProbe holds the liveness probe off"
    # gunicorn gets its graceful_timeout for a worker that is finishing a job when the pod is stopped.
    graceful = re.search(r"^graceful_timeout = (\d+)$", (ROOT / "gunicorn.conf.py").read_text(), re.MULTILINE)
    assert graceful
    for each in of_kind("Deployment"):
        assert int(pod_template(each)["spec"].get("terminationGracePeriodSeconds", 30)) > int(graceful.group(1))


def test_the_cli_flags_used_in_the_manifests_exist() -> None:
    commands = hyperion_lock_commands()
    assert {c[1] for c in commands} == {"run", "wait"}, commands
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["hyperion-lock"] == "hyperion_lock.cli.main:main"
    for command in commands:
        text = cli_help(command[1])
        for flag in flags(command[2:]):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), f"{flag} not in `{command[1]} --help`"
        build_parser().parse_args(command[1:])  # the values parse too (e.g. --timeout as a number)


def test_the_release_placeholder_is_one_value_everywhere() -> None:
    assert validate_name(PLACEHOLDER, "generation") == PLACEHOLDER
    assert LABEL_VALUE_RE.fullmatch(PLACEHOLDER)
    images = set()
    for workload in workloads():
        assert pod_labels(workload)[VERSION_LABEL] == PLACEHOLDER
        for container in all_containers(workload):
            assert container["image"].endswith(":" + PLACEHOLDER), container["image"]
            images.add(container["image"])
    assert len(images) == 1, images
    readme = (MANIFESTS / "README.md").read_text()
    assert PLACEHOLDER in readme and "kubectl create secret generic" in readme
    # The README's commands name the Job that they delete before a new release.
    assert f"kubectl delete job {only('Job')['metadata']['name']} " in readme
