"""infra/ without a cluster: every YAML file parses, the KubeRay manifests have the fields KubeRay needs, every command
the files run (`python -m jobs.X`, `s2t X`, `ray ...`, `serve ...`, Serve's import_path) exists and takes the options
given, the RayService serves exactly infra/serve.yaml, the Dockerfile copies what exists, and the cluster launcher
config passes Ray's own validation."""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import importlib.metadata
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
RAY_KINDS = {"RayCluster", "RayJob", "RayCronJob", "RayService"}
GPU = "nvidia.com/gpu"


# ---------------------------------------------------------------------------------------------------------- helpers


def yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def embedded(doc: dict) -> list[dict]:
    """Manifests a ConfigMap holds as YAML text (the CronJob fallback's RayJob)."""
    if doc.get("kind") != "ConfigMap":
        return []
    return [
        d
        for key, text in (doc.get("data") or {}).items()
        if key.endswith((".yaml", ".yml"))
        for d in yaml.safe_load_all(text)
        if d is not None
    ]


def manifests(path: Path) -> list[dict]:
    docs = load_all(path)
    return docs + [d for doc in docs for d in embedded(doc)]


def one(path: Path, kind: str) -> dict:
    found = [doc for doc in manifests(path) if doc.get("kind") == kind]
    assert len(found) == 1, f"{path.relative_to(ROOT)}: {len(found)} documents of kind {kind}, expected 1"
    return found[0]


def ray_containers(cluster: dict) -> list[dict]:
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def gpus(container: dict) -> int:
    return int((container.get("resources") or {}).get("limits", {}).get(GPU, 0))


def env_names(container: dict, from_secret: bool = False) -> set[str]:
    return {e["name"] for e in container.get("env", []) if not from_secret or "secretKeyRef" in e.get("valueFrom", {})}


def option_value(command: str, option: str) -> str | None:
    tokens = shlex.split(command)
    for i, token in enumerate(tokens):
        if token == option and i + 1 < len(tokens):
            return tokens[i + 1]
        if token.startswith(option + "="):
            return token.split("=", 1)[1]
    return None


def check_cluster_spec(
    cluster: dict, where: str, secret_env: tuple[str, ...] = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
) -> int:
    """The fields KubeRay needs in a RayCluster spec; returns the most GPUs its worker groups can have."""
    assert cluster.get("rayVersion") == importlib.metadata.version("ray"), f"{where}: rayVersion is not the Ray we pin"
    head = cluster["headGroupSpec"]
    groups = [head, *cluster.get("workerGroupSpecs", [])]
    for group in groups:
        # rayStartParams is map[string]string: a number there fails the CRD's validation.
        assert isinstance(group.get("rayStartParams"), dict), f"{where}: a group without rayStartParams"
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), f"{where}: non-string rayStartParams"
        assert group["template"]["spec"]["containers"][0].get("image"), f"{where}: a group without an image"
    assert not any(gpus(c) for c in head["template"]["spec"]["containers"]), f"{where}: the head should be CPU only"
    workers = cluster.get("workerGroupSpecs") or []
    assert workers, f"{where}: no workerGroupSpecs"
    capacity = 0
    for group in workers:
        assert group.get("groupName"), f"{where}: a worker group without groupName"
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", group.get("replicas", 0))
        assert low <= group.get("replicas", low) <= high, f"{where}: {group['groupName']}: replicas out of range"
        for container in group["template"]["spec"]["containers"]:
            requested = (container.get("resources") or {}).get("requests", {}).get(GPU)
            assert requested is None or int(requested) == gpus(container), f"{where}: GPU requests != limits"
            capacity += high * gpus(container)
    assert capacity > 0, f"{where}: no worker group with GPUs ({GPU} limits)"
    for container in ray_containers(cluster):
        missing = set(secret_env) - env_names(container, from_secret=True)
        assert not missing, f"{where}: container {container['name']} lacks {sorted(missing)} from a Secret"
    return capacity


def check_rayjob_spec(spec: dict, where: str, module: str) -> None:
    assert isinstance(spec.get("entrypoint"), str) and spec["entrypoint"].strip(), f"{where}: no entrypoint"
    assert spec["entrypoint"].startswith(f"python -m {module} "), f"{where}: the entrypoint should run {module}"
    assert spec.get("shutdownAfterJobFinishes") is True, f"{where}: shutdownAfterJobFinishes should be true"
    assert isinstance(spec.get("backoffLimit"), int) and spec["backoffLimit"] >= 1, f"{where}: backoffLimit >= 1"
    assert "rayClusterSpec" in spec and "clusterSelector" not in spec, f"{where}: the job brings its own cluster"
    capacity = check_cluster_spec(spec["rayClusterSpec"], where)
    # The generation actor pool at its largest fits in the worker groups at theirs.
    entrypoint = spec["entrypoint"]
    num_gpus = float(option_value(entrypoint, "--num-gpus") or 0)
    assert num_gpus > 0, f"{where}: the job should generate on GPUs (--num-gpus)"
    actors = max(
        int(option_value(entrypoint, "--generation-actors") or 1),
        int(option_value(entrypoint, "--max-generation-actors") or 0),
    )
    assert actors * num_gpus <= capacity, f"{where}: {actors} actors x {num_gpus} GPUs > {capacity} GPUs at most"


# --------------------------------------------------------------------------------------------------- every file


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_yaml_parses(path):
    docs = manifests(path)
    assert docs and all(isinstance(doc, dict) for doc in docs)
    if path.is_relative_to(KUBERAY):
        for doc in docs:
            assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), doc
            if doc["kind"] in RAY_KINDS:
                assert doc["apiVersion"] == "ray.io/v1", f"{path.name}: {doc['kind']} should be ray.io/v1"


def test_the_expected_manifests_are_there():
    kinds = {path.name: sorted(doc["kind"] for doc in manifests(path)) for path in KUBERAY.glob("*.yaml")}
    assert kinds["rayjob-transcribe.yaml"] == ["RayJob"]
    assert kinds["raycronjob-backfill.yaml"] == ["RayCronJob"]
    assert kinds["cronjob-backfill.yaml"] == ["ConfigMap", "CronJob", "RayJob", "Role", "RoleBinding", "ServiceAccount"]
    assert kinds["rayservice.yaml"] == ["RayService"]


def test_one_image_everywhere():
    """Every Ray pod of every manifest runs the same image (build it once from infra/Dockerfile)."""
    images = set()
    for path in KUBERAY.glob("*.yaml"):
        for doc in manifests(path):
            spec = doc.get("spec", {})
            spec = spec.get("jobTemplate", spec)
            cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig")
            if doc["kind"] in RAY_KINDS and cluster:
                images |= {c["image"] for c in ray_containers(cluster)}
    assert len(images) == 1, images


# ------------------------------------------------------------------------------------------------------- KubeRay


def test_rayjob_transcribe():
    job = one(KUBERAY / "rayjob-transcribe.yaml", "RayJob")
    check_rayjob_spec(job["spec"], "rayjob-transcribe.yaml", "jobs.transcribe")


def test_raycronjob_backfill():
    cron = one(KUBERAY / "raycronjob-backfill.yaml", "RayCronJob")
    assert cron["apiVersion"] == "ray.io/v1"
    assert re.fullmatch(r"(\S+\s+){4}\S+", cron["spec"]["schedule"]), "schedule: five cron fields"
    # spec.timeZone is KubeRay >= 1.7; the alpha in 1.6 rejects it.
    assert set(cron["spec"]) <= {"schedule", "jobTemplate", "suspend"}
    check_rayjob_spec(cron["spec"]["jobTemplate"], "raycronjob-backfill.yaml", "jobs.backfill")


def test_cronjob_fallback_creates_the_same_rayjob():
    path = KUBERAY / "cronjob-backfill.yaml"
    cron, account, role, binding, config = (
        one(path, kind) for kind in ("CronJob", "ServiceAccount", "Role", "RoleBinding", "ConfigMap")
    )
    rayjob = one(path, "RayJob")
    template = one(KUBERAY / "raycronjob-backfill.yaml", "RayCronJob")["spec"]
    assert cron["apiVersion"] == "batch/v1"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert cron["spec"]["schedule"] == template["schedule"]
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["spec"] == template["jobTemplate"]
    assert rayjob["metadata"]["ownerReferences"][0]["kind"] == "Job"

    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"]}]
    assert binding["roleRef"]["kind"] == "Role" and binding["roleRef"]["name"] == role["metadata"]["name"]
    granted = {
        verb
        for rule in role["rules"]
        if "ray.io" in rule["apiGroups"] and "rayjobs" in rule["resources"]
        for verb in rule["verbs"]
    }
    assert {"create", "get"} <= granted
    # The script reads the ConfigMap where it is mounted.
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    volume = next(v for v in pod["volumes"] if v.get("configMap", {}).get("name") == config["metadata"]["name"])
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    assert env["RAYJOB_MANIFEST"] == f"{mount['mountPath']}/rayjob.yaml" and "rayjob.yaml" in config["data"]
    assert (
        cron["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"] > template["jobTemplate"]["activeDeadlineSeconds"]
    ), "the RayJob's deadline should end a run before the CronJob's Job gives up"


def fake_kubectl(tmp_path: Path) -> Path:
    """kubectl as the CronJob's script sees it: no RayJob until `create`, then Running once, then $DEPLOYMENT."""
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "kubectl"
    script.write_text(r"""#!/bin/sh
echo "$*" >> "$STATE/calls"
case "$1 $2" in
  "get rayjob")
    [ -f "$STATE/created.yaml" ] || { echo "not found" >&2; exit 1; }
    case "$*" in
      *jobDeploymentStatus*)
        n=$(cat "$STATE/polls" 2>/dev/null || echo 0); n=$((n + 1)); echo "$n" > "$STATE/polls"
        if [ "$n" -lt 2 ]; then printf Running; else printf '%s' "$DEPLOYMENT"; fi ;;
      *jobStatus*) printf '%s' "$JOB_STATUS" ;;
    esac ;;
  "create -f") cat > "$STATE/created.yaml" ;;
  *) echo "unexpected: kubectl $*" >&2; exit 2 ;;
esac
""")
    script.chmod(0o755)
    return folder


@pytest.mark.parametrize(
    "deployment, job_status, succeeds",
    [("Complete", "SUCCEEDED", True), ("Failed", "FAILED", False), ("Complete", "STOPPED", False)],
)
def test_cronjob_fallback_script(tmp_path, deployment, job_status, succeeds):
    path = KUBERAY / "cronjob-backfill.yaml"
    container = one(path, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    manifest = tmp_path / "rayjob.yaml"
    manifest.write_text(one(path, "ConfigMap")["data"]["rayjob.yaml"])
    state = tmp_path / "state"
    state.mkdir()
    env = {
        **os.environ,
        "PATH": f"{fake_kubectl(tmp_path)}{os.pathsep}{os.environ['PATH']}",
        "STATE": str(state),
        "JOB_NAME": "s2t-backfill-29000000",
        "JOB_UID": "0b5c-uid",
        "RAYJOB_MANIFEST": str(manifest),
        "POLL_SECONDS": "0",
        "DEPLOYMENT": deployment,
        "JOB_STATUS": job_status,
    }
    command = [*container["command"], *container["args"]]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert (run.returncode == 0) == succeeds, run.stdout + run.stderr
    created = yaml.safe_load((state / "created.yaml").read_text())
    assert created["metadata"]["name"] == "s2t-backfill-29000000"
    assert created["metadata"]["ownerReferences"][0] == {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "name": "s2t-backfill-29000000",
        "uid": "0b5c-uid",
    }
    assert created["spec"] == one(path, "RayJob")["spec"]
    # A retried pod finds the RayJob its predecessor created and waits for it: no second create.
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert (run.returncode == 0) == succeeds
    assert sum(line.startswith("create") for line in (state / "calls").read_text().splitlines()) == 1


def test_rayservice_serves_infra_serve_yaml():
    service = one(KUBERAY / "rayservice.yaml", "RayService")
    assert service["apiVersion"] == "ray.io/v1"
    serve_yaml = (INFRA / "serve.yaml").read_text()
    config = service["spec"]["serveConfigV2"]
    assert isinstance(config, str), "serveConfigV2 is a YAML string"
    assert yaml.safe_load(config) == yaml.safe_load(serve_yaml)
    spec = importlib.util.spec_from_file_location("infra_render", INFRA / "render.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    assert config == render.serve_config(serve_yaml), "run python infra/render.py"
    check = subprocess.run([sys.executable, str(INFRA / "render.py"), "--check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr

    cluster = service["spec"]["rayClusterConfig"]
    key_env = [
        app["args"]["api_key_env"] for app in yaml.safe_load(config)["applications"] if app["args"].get("api_key_env")
    ]
    assert key_env, "infra/serve.yaml should require a bearer token"
    capacity = check_cluster_spec(cluster, "rayservice.yaml", secret_env=("AWS_ACCESS_KEY_ID", *key_env))
    for app in yaml.safe_load(config)["applications"]:
        args = app["args"]
        needed = (args.get("max_replicas") or args.get("replicas", 1)) * args.get("gpus_per_replica", 0)
        assert needed <= capacity, f"{app['name']}: {needed} GPUs at most replicas, the workers have {capacity}"


def serve_configs() -> dict[str, dict]:
    configs = {"serve.yaml": yaml.safe_load((INFRA / "serve.yaml").read_text())}
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in manifests(path):
            if doc.get("kind") == "RayService":
                configs[f"kuberay/{path.name}"] = yaml.safe_load(doc["spec"]["serveConfigV2"])
    return configs


@pytest.mark.parametrize("where", sorted(serve_configs()))
def test_serve_import_path_builds(where, monkeypatch):
    """`serve deploy` and the RayService import pipeline.serve:build_app and call it with the app's args."""
    from ray import serve

    config = serve_configs()[where]
    for app in config["applications"]:
        module, _, attr = app["import_path"].partition(":")
        builder = getattr(importlib.import_module(module), attr)
        if app["args"].get("api_key_env"):
            monkeypatch.setenv(app["args"]["api_key_env"], "test-key")
        assert isinstance(builder(app["args"]), serve.Application), f"{where}: {app['import_path']}"


# ---------------------------------------------------------------------------------- commands named in infra files

SEPARATORS = {"&&", "||", ";", "|", "&"}


def logical_lines(text: str) -> list[str]:
    return text.replace("\\\n", " ").splitlines()


def shell_texts() -> list[tuple[str, str]]:
    """(file, line) for every line of infra/ that is a command: YAML string values (entrypoints, scripts, setup
    commands, embedded manifests), YAML comment lines written as commands ('#   cmd'), Dockerfile RUN lines, and
    the shell blocks of infra/README.md, README.md and docs/."""
    found = []

    def strings(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, dict):
            for value in node.values():
                yield from strings(value)
        elif isinstance(node, list):
            for value in node:
                yield from strings(value)

    for path in yaml_files():
        name = str(path.relative_to(ROOT))
        text = path.read_text()
        for doc in manifests(path):
            for value in strings(doc):  # a command has arguments: names and plain values ("s2t", "serve") are not
                found += [(name, line) for line in logical_lines(value) if " " in line.strip()]
        found += [(name, line.lstrip()[1:]) for line in text.splitlines() if re.match(r"\s*#   \S", line)]
    dockerfile = INFRA / "Dockerfile"
    found += [
        ("infra/Dockerfile", line)
        for line in logical_lines(dockerfile.read_text())
        if re.match(r"#   \S", line) or line.startswith("RUN ")
    ]
    for page in [INFRA / "README.md", ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = page.read_text()
        for block in re.findall(r"^```(?:bash|sh|shell|console)?\n(.*?)^```", text, flags=re.M | re.S):
            found += [(str(page.relative_to(ROOT)), line) for line in logical_lines(block)]
    return found


def split_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line, each a token list without its redirections; `ray job submit ... -- CMD`
    gives CMD too."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        tokens = line.split()
    commands, current, skip = [], [], False
    for token in tokens:
        if skip:
            skip = False
            continue
        ends = token not in SEPARATORS and token.endswith(";")
        token = token[:-1] if ends else token
        if token in SEPARATORS:
            commands.append(current)
            current = []
            continue
        if re.match(r"\d*[<>]", token):  # a redirection: >/dev/null, 2>&1, or `>` with its target next
            skip = re.fullmatch(r"\d*[<>]+&?", token) is not None
        elif token:
            current.append(token)
        if ends:
            commands.append(current)
            current = []
    commands.append(current)
    out = []
    for command in commands:
        while command and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", command[0]):  # VAR=value cmd
            command = command[1:]
        if command[:1] == ["ray"] and "--" in command:
            cut = command.index("--")
            out += [command[:cut], command[cut + 1 :]]
        elif command:
            out.append(command)
    return out


def named_commands() -> dict[str, list[tuple[str, list[str]]]]:
    """Commands by program: 'transcribe' for both `python -m jobs.transcribe` and `s2t transcribe`, 'ray job submit',
    'serve deploy', ...: {name: [(file, tokens), ...]}."""
    named: dict[str, list] = {}
    for where, line in shell_texts():
        for tokens in split_commands(line):
            if (
                len(tokens) >= 3
                and re.fullmatch(r"python3?", tokens[0])
                and tokens[1] == "-m"
                and tokens[2].startswith("jobs.")
            ):
                name = tokens[2].removeprefix("jobs.")
            elif tokens[0] == "s2t":
                name = tokens[1] if len(tokens) > 1 and not tokens[1].startswith("-") else "s2t"
            elif tokens[0] in ("ray", "serve"):
                path = []
                for token in tokens[1:]:
                    if not re.fullmatch(r"[a-z][a-z-]*", token):
                        break
                    path.append(token)
                name = " ".join([tokens[0], *path])
            else:
                continue
            named.setdefault(name, []).append((where, tokens))
    return named


def venv_tool(name: str) -> Path:
    return Path(sys.executable).parent / name


@cache
def help_text(argv: tuple[str, ...]) -> str:
    run = subprocess.run(
        [*argv, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"}
    )
    assert run.returncode == 0, f"{' '.join(argv)} --help failed:\n{run.stderr[-3000:]}"
    return run.stdout


def options_of(tokens: list[str]) -> list[str]:
    return [token.split("=", 1)[0] for token in tokens if re.fullmatch(r"--?[A-Za-z][\w-]*(=.*)?", token)]


def s2t_path(tokens: list[str]) -> list[str]:
    """The subcommand path of `s2t ...` tokens (transcribe; bench model; ...), from the real parser."""
    from jobs.cli import build_parser

    parser, path = build_parser(), []
    for token in tokens:
        subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subparsers or token not in subparsers[0].choices:
            break
        parser = subparsers[0].choices[token]
        path.append(token)
    return path


def check_command(tokens: list[str]) -> None:
    """The command exists (its --help runs), every option given is in that help, and the jobs' own parsers and
    pydantic configs accept the whole command line."""
    if tokens[0] in ("ray", "serve"):
        path = []
        for token in tokens[1:]:
            if not re.fullmatch(r"[a-z][a-z-]*", token):
                break
            path.append(token)
        tool = venv_tool(tokens[0])
        if not tool.exists():
            pytest.skip(f"no {tool}")
        help_argv, args = (str(tool), *path), tokens[1 + len(path) :]
    elif tokens[0] == "s2t":
        path = s2t_path(tokens[1:])
        help_argv, args = (sys.executable, "-m", "jobs.cli", *path), tokens[1 + len(path) :]
    else:
        help_argv, args = (sys.executable, "-m", tokens[2]), tokens[3:]
    text = help_text(help_argv)
    for option in options_of(args):
        assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), (
            f"{' '.join(tokens)}: {option} is not an option of {' '.join(help_argv[-2:])}"
        )
    if tokens[0] in ("ray", "serve") or {"-h", "--help"} & set(args):
        return
    # The job's own parser, as `s2t` and `python -m jobs.X` build it, then its typed config.
    from pipeline.config import JobConfig

    if tokens[0] == "s2t":
        from jobs.cli import build_parser

        parser, argv = build_parser(), [*path, *args]
        module_name = None
    else:
        module_name = tokens[2]
        parser, argv = argparse.ArgumentParser(prog=f"python -m {module_name}"), args
        importlib.import_module(module_name).add_arguments(parser)
    try:
        parsed = parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{' '.join(tokens)}: the job's parser rejects this command line")
    module = sys.modules[module_name or parsed.run.__module__]
    configs = {
        v for v in vars(module).values() if isinstance(v, type) and issubclass(v, JobConfig) and v is not JobConfig
    }
    if len(configs) == 1:
        try:
            configs.pop().from_args(parsed)
        except SystemExit as error:  # "invalid configuration: ..." when a value is wrong
            pytest.fail(f"{' '.join(tokens)}: {error}")


COMMANDS = named_commands()


def test_the_commands_are_found():
    """The scan finds the entry points the manifests run (so an empty scan cannot pass the tests below)."""
    assert {"transcribe", "backfill", "serve", "ray up", "ray job submit", "serve deploy"} <= set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_exists_and_takes_its_options(name):
    for where, tokens in COMMANDS[name]:
        try:
            check_command(tokens)
        except AssertionError as error:
            raise AssertionError(f"{where}: {error}") from None


def test_the_option_check_catches_a_misspelling():
    entrypoint = one(KUBERAY / "rayjob-transcribe.yaml", "RayJob")["spec"]["entrypoint"]
    check_command(shlex.split(entrypoint))
    with pytest.raises(AssertionError, match="--num-gpu is not an option"):
        check_command(shlex.split(entrypoint.replace("--num-gpus", "--num-gpu")))  # argparse would even take it
    with pytest.raises(pytest.fail.Exception, match="invalid configuration|rejects"):
        check_command(shlex.split(entrypoint.replace("--dtype float16", "--dtype float17")))


# ------------------------------------------------------------------------------------------------------ Dockerfile


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comment lines dropped."""
    lines = [line for line in (INFRA / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
        for line in joined.splitlines()
        if line.strip()
    ]


def dockerignore_excludes(path: str) -> bool:
    excluded = False
    for pattern in (INFRA / "Dockerfile.dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern.removeprefix("**/")):
            excluded = not negate
    return excluded


def copy_sources() -> list[str]:
    sources = []
    for instruction, args in dockerfile():
        if instruction in ("COPY", "ADD"):
            tokens = [t for t in shlex.split(args) if not t.startswith("--")]
            assert not any(t.startswith("--from") for t in shlex.split(args)), "no multi-stage copies expected"
            sources += tokens[:-1]
    return sources


def test_dockerfile():
    instructions = dockerfile()
    names = [i for i, _ in instructions]
    first_from = names.index("FROM")
    before = {args.split("=", 1)[0].strip() for i, args in instructions[:first_from] if i == "ARG"}
    after = {
        args.split("=", 1)[0].strip(): args.partition("=")[2] for i, args in instructions[first_from:] if i == "ARG"
    }
    assert names.count("FROM") == 1 and re.search(r"\$\{?BASE_IMAGE\}?", instructions[first_from][1])
    assert "BASE_IMAGE" in before and "TORCH_INDEX" in after
    assert "download.pytorch.org/whl/cpu" in after["TORCH_INDEX"], "CPU torch by default"
    body = "\n".join(args for i, args in instructions[first_from + 1 :] if i != "ARG")
    for name in after:
        assert re.search(rf"\$\{{?{name}\b", body), f"ARG {name} is never used"
    for name in before - set(after):
        assert not re.search(rf"\$\{{?{name}\b", body), f"{name} is used after FROM without an ARG there"
    install = next(args for i, args in instructions if i == "RUN" and "pip install" in args)
    assert "-c constraints.txt" in install and re.search(r"--extra-index-url\s+\"?\$\{?TORCH_INDEX", install)
    assert re.search(r"\.\[\$\{EXTRAS\}\]", install) and after.get("EXTRAS") == "pipeline"


def test_dockerfile_copies_what_the_build_needs():
    sources = copy_sources()
    for source in sources:
        assert list(ROOT.glob(source)), f"COPY {source}: no such file in the repository"
        assert not dockerignore_excludes(source), f"COPY {source}: infra/Dockerfile.dockerignore leaves it out"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", "constraints.txt", project["project"]["readme"]}
    needed |= {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert needed <= set(sources), f"the build needs {sorted(needed - set(sources))}"
    for excluded in (".venv", ".git", "out"):
        assert dockerignore_excludes(excluded), f"{excluded} should stay out of the build context"


# -------------------------------------------------------------------------------------------- cluster launcher


def test_cluster_launcher_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((INFRA / "cluster.yaml").read_text())
    config = prepare_config(raw)  # Ray's defaults for the provider filled in, as `ray up` does
    validate_config(config)  # ray-schema.json and the launcher's own checks
    assert raw["provider"]["type"] == "aws"
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert not head.get("resources", {}).get("GPU"), "a CPU head"
    gpu_types = [t for name, t in types.items() if name != raw["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "a GPU worker type (resources: GPU)"
    for worker in gpu_types:
        assert worker["max_workers"] > worker.get("min_workers", 0), "the GPU workers autoscale"
        assert worker["max_workers"] <= raw["max_workers"]
    assert raw["docker"]["image"]
    setup = " ".join(raw["setup_commands"])
    assert "pip install" in setup and "-c constraints.txt" in setup and "[pipeline]" in setup
    # The same files as the image: what the Dockerfile copies is what file_mounts copies.
    local = set(raw["file_mounts"].values())
    assert all((ROOT / p).exists() for p in local)
    assert local == set(copy_sources())


def test_readme_paths_exist():
    readme = (INFRA / "README.md").read_text()
    paths = {m.rstrip(".,:;)`'") for m in re.findall(r"\binfra/[\w./-]+", readme)}
    assert paths
    for path in paths:
        assert (ROOT / path).exists(), f"infra/README.md names {path}, which does not exist"


# ---------------------------------------------------------------------------------------------- metrics, Grafana


def test_grafana_dashboard_charts_every_metric_the_code_exports_and_no_other():
    import json

    from pipeline.metrics import NAMES

    dashboard = json.loads((INFRA / "grafana" / "s2t-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    charted = {re.sub(r"_(bucket|count|sum)$", "", name) for e in exprs for name in re.findall(r"\bray_s2t_\w+", e)}
    # Ray puts "ray_" before every application metric's name; a histogram is charted through its _bucket series.
    assert charted == {f"ray_{name}" for name in NAMES}
    for e in exprs:
        for name in re.findall(r"\bray_s2t_\w+", e):
            base = re.sub(r"_(bucket|count|sum)$", "", name)[len("ray_") :]
            assert (NAMES[base][0] == "Histogram") == (name != f"ray_{base}"), e
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"]


@pytest.mark.parametrize("name, kind", [("rayservice.yaml", "RayService"), ("rayjob-transcribe.yaml", "RayJob")])
def test_ray_pods_export_metrics_where_the_podmonitor_scrapes_and_point_at_the_dashboard(name, kind):
    import json

    doc = one(KUBERAY / name, kind)
    uid = json.loads((INFRA / "grafana" / "s2t-dashboard.json").read_text())["uid"]
    assert doc["metadata"]["labels"]["s2t-ray/grafana-dashboard"] == uid
    cluster = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig")
    monitor = one(KUBERAY / "monitoring.yaml", "PodMonitor")
    port = monitor["spec"]["podMetricsEndpoints"][0]["port"]
    for container in ray_containers(cluster):
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        assert ports.get(port) == 8080, container["name"]  # KubeRay's default --metrics-export-port
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {e["name"] for e in head["env"]}
    assert {"RAY_GRAFANA_HOST", "RAY_PROMETHEUS_HOST", "RAY_GRAFANA_IFRAME_HOST"} <= env
