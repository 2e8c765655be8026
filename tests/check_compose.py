"""Validate docker-compose.yml without a Docker engine: structure, images, health and wiring."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ALLOWED_SERVICE_KEYS = {
    "image",
    "build",
    "restart",
    "environment",
    "volumes",
    "healthcheck",
    "depends_on",
    "ports",
    "stop_grace_period",
    "command",
    "env_file",
    "networks",
    "ulimits",
}


def problems(compose: dict[str, object]) -> list[str]:
    found = []
    services = compose.get("services")
    if not isinstance(services, dict) or not services:
        return ["no services"]
    for name, service in services.items():
        unknown = set(service) - ALLOWED_SERVICE_KEYS
        if unknown:
            found.append(f"{name}: unknown keys {sorted(unknown)}")
        if "image" not in service and "build" not in service:
            found.append(f"{name}: needs image or build")
        image = service.get("image", "")
        if image and (":" not in image or image.endswith(":latest")):
            found.append(f"{name}: pin the image version ({image})")
        for dependency, rule in service.get("depends_on", {}).items():
            if dependency not in services:
                found.append(f"{name}: depends on unknown service {dependency}")
            elif (
                rule.get("condition") == "service_healthy"
                and "healthcheck" not in services[dependency]
            ):
                found.append(
                    f"{name}: waits for {dependency} to be healthy, which has no healthcheck"
                )
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith((".", "/")) and source not in (compose.get("volumes") or {}):
                found.append(f"{name}: volume {source} is not declared")
        for network in service.get("networks", []):
            if network not in (compose.get("networks") or {}):
                found.append(f"{name}: network {network} is not declared")
    return found


def main(paths: list[str]) -> int:
    failed = False
    for path in paths:
        for problem in problems(yaml.safe_load(Path(path).read_text())):
            print(f"{path}: {problem}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
