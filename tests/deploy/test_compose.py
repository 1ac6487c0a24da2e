"""docker-compose.yml (GPU) and docker-compose.cpu.yml: valid for Compose, and saying what the README says."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO
from tests.deploy.tools import run

BASE = REPO / "docker-compose.yml"
CPU = REPO / "docker-compose.cpu.yml"
VARIANTS = {"gpu": (BASE,), "cpu": (BASE, CPU)}


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path.name} is not a mapping"
    return data


def profiles() -> list[str]:
    found = {p for path in (BASE, CPU) for s in load(path)["services"].values() for p in (s or {}).get("profiles", [])}
    return sorted(found)


def compose_command() -> list[str]:
    """docker-compose (Debian's 1.29 or the 2.x binary), else the `docker compose` plugin, else skip."""
    if path := shutil.which("docker-compose"):
        return [path]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    pytest.skip("neither docker-compose nor `docker compose` is installed (scripts/test-tools.sh installs the first)")


def clean_env() -> dict[str, str]:
    """The environment without the variables the compose files read, so the defaults are what we check."""
    ours = ("VAE_", "MONITORING_", "PROMETHEUS_", "GRAFANA_", "COMPOSE_")
    return {k: v for k, v in os.environ.items() if not k.startswith(ours)}


def config(variant: str, profile: str | None = None, **variables: str) -> dict[str, Any]:
    """`compose config` of a variant: the files merged, variables filled in, validated by Compose itself."""
    args = [*compose_command(), "--project-directory", str(REPO)]
    for path in VARIANTS[variant]:
        args += ["-f", str(path)]
    if profile:
        args += ["--profile", profile]
    merged = yaml.safe_load(run(*args, "config", env=clean_env() | variables))
    assert isinstance(merged, dict)
    return merged


def active(merged: dict[str, Any], profile: str | None = None) -> dict[str, dict[str, Any]]:
    """The services `up` starts: those without profiles, and those in `profile`."""
    return {
        name: s for name, s in merged["services"].items() if not s.get("profiles") or profile in s.get("profiles", [])
    }


def published(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host ip, host port) of each published port, from the short or the long syntax."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.append((str(port.get("host_ip", "")), str(port.get("published", ""))))
        else:
            parts = str(port).split(":")
            out.append((parts[0], parts[1]) if len(parts) == 3 else ("", parts[0]))
    return out


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []


@pytest.mark.parametrize("profile", [None, *profiles()])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_compose_accepts_every_variant_and_profile(variant: str, profile: str | None) -> None:
    merged = config(variant, profile)
    services = active(merged, profile)
    assert "prometheus" in services
    assert ("grafana" in services) == (profile == "grafana")


def test_plain_up_reserves_one_nvidia_gpu_for_the_service() -> None:
    services = active(config("gpu"))
    service = services["vae-serve"]
    assert gpu_devices(service) == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert service["environment"]["VAE_DEVICE"] == "cuda"
    assert [name for name, s in services.items() if gpu_devices(s)] == ["vae-serve"]


def test_the_cpu_override_reserves_no_gpu_and_keeps_the_network_name() -> None:
    services = active(config("cpu"))
    assert "vae-serve" not in services, "the GPU service must stay down with the CPU override"
    cpu = services["vae-serve-cpu"]
    assert cpu["environment"]["VAE_DEVICE"] == "cpu"
    assert not [name for name, s in services.items() if gpu_devices(s)]
    assert "vae-serve" in cpu["networks"]["default"]["aliases"], "Prometheus scrapes vae-serve:8000"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_port_is_published_on_localhost_by_default(variant: str) -> None:
    merged = config(variant, "grafana")
    ports = {name: published(s) for name, s in active(merged, "grafana").items()}
    service = "vae-serve" if variant == "gpu" else "vae-serve-cpu"
    assert ports[service] == [("127.0.0.1", "8000")]
    assert ports["prometheus"] == [("127.0.0.1", "9090")]
    assert ports["grafana"] == [("127.0.0.1", "3000")]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_api_key_and_cors_origins_set_on_the_host_reach_the_service(variant: str) -> None:
    """README: VAE_BIND=0.0.0.0 exposes the service, "set VAE_API_KEY then": it must reach the container."""
    name = "vae-serve" if variant == "gpu" else "vae-serve-cpu"
    unset = active(config(variant))[name]["environment"]
    assert unset["VAE_API_KEY"] == unset["VAE_CORS_ORIGINS"] == ""  # no key, no CORS: the service's defaults
    env = active(config(variant, VAE_API_KEY="s3cret", VAE_CORS_ORIGINS="https://app.example.com"))[name]["environment"]
    assert env["VAE_API_KEY"] == "s3cret" and env["VAE_CORS_ORIGINS"] == "https://app.example.com"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_vae_tracing_builds_the_exporter_in_and_sends_spans_where_the_host_says(variant: str) -> None:
    """README: `VAE_TRACING=true OTEL_EXPORTER_OTLP_ENDPOINT=... docker compose up --build`."""
    name = "vae-serve" if variant == "gpu" else "vae-serve-cpu"
    off = active(config(variant))[name]
    assert off["build"]["args"]["VAE_TRACING"] == off["environment"]["FASTAPI_OTEL_AUTO_CONFIGURE"] == "false"
    assert off["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == ""
    on = active(config(variant, VAE_TRACING="true", OTEL_EXPORTER_OTLP_ENDPOINT="http://collector:4318"))[name]
    assert on["build"]["args"]["VAE_TRACING"] == on["environment"]["FASTAPI_OTEL_AUTO_CONFIGURE"] == "true"
    assert on["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector:4318"
    assert on["environment"]["OTEL_SERVICE_NAME"] == "vae-serve"


def test_models_are_mounted_read_only_where_the_image_looks() -> None:
    for name in ("vae-serve", "vae-serve-cpu"):
        service = load(CPU if name.endswith("cpu") else BASE)["services"][name]
        assert "./models:/app/models:ro" in service["volumes"]


def test_the_cpu_service_is_the_gpu_service_without_the_gpu() -> None:
    """docker-compose.cpu.yml repeats the service (no Compose can delete a key portably): keep them in step."""
    gpu = dict(load(BASE)["services"]["vae-serve"])
    cpu = dict(load(CPU)["services"]["vae-serve-cpu"])
    assert gpu.pop("deploy") and cpu.pop("networks")
    assert gpu.pop("image") == "vae-serve:latest" and cpu.pop("image") == "vae-serve:cpu"
    gpu_build, cpu_build = gpu.pop("build"), cpu.pop("build")
    assert gpu_build["args"].pop("TORCH_INDEX_URL").endswith("/cu124")
    assert cpu_build["args"].pop("TORCH_INDEX_URL").endswith("/cpu")
    assert gpu_build == cpu_build
    gpu_env, cpu_env = gpu.pop("environment"), cpu.pop("environment")
    assert gpu_env.pop("VAE_DEVICE") == "cuda" and cpu_env.pop("VAE_DEVICE") == "cpu"
    # more processes pay on a GPU only
    assert gpu_env.pop("VAE_WORKERS") == "${VAE_WORKERS:-4}" and cpu_env.pop("VAE_WORKERS") == "${VAE_WORKERS:-1}"
    assert gpu_env == cpu_env
    assert gpu == cpu


def test_prometheus_and_grafana_mount_the_files_in_deploy() -> None:
    services = load(BASE)["services"]
    mounts = [v.split(":")[0] for s in ("prometheus", "grafana") for v in services[s]["volumes"] if v.startswith("./")]
    for mount in mounts:
        assert (REPO / mount).is_dir(), f"{mount} is mounted but missing"
    assert (REPO / "deploy/prometheus/prometheus.yml").is_file()
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == "/etc/grafana/dashboards/vae-serve.json"
    assert (REPO / "deploy/grafana/dashboards/vae-serve.json").is_file()
