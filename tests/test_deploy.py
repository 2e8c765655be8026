"""The deployment files speak of metrics and endpoints that exist."""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import ClientFactory
from helpers import AUTH, flespi_message

DEPLOY = Path(__file__).parent.parent / "deploy"
METRIC = re.compile(r"flespi_receiver_[a-z_]+")


async def exported_names(receiver: ClientFactory) -> set[str]:
    client = await receiver()
    await client.post("/flespi", data=orjson.dumps([flespi_message(1)]), headers=AUTH)
    text = await (await client.get("/metrics")).text()
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    # every series a family can have, including labelled ones not observed yet
    return {
        family.name + suffix
        for family in text_string_to_metric_families(text)
        for suffix in suffixes.get(family.type, [""])
    }


async def test_alert_rules_and_dashboard_use_real_metrics(receiver: ClientFactory) -> None:
    names = await exported_names(receiver)
    rules = yaml.safe_load((DEPLOY / "prometheus-alerts.yml").read_text())
    expressions = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    dashboard = orjson.loads((DEPLOY / "grafana-dashboard.json").read_bytes())
    expressions += [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in expressions for name in METRIC.findall(expr)}
    assert used, "no receiver metric is used"
    assert used <= names, used - names


def test_health_checks_probe_real_endpoints() -> None:
    dockerfile = (DEPLOY.parent / "Dockerfile").read_text()
    assert "/healthz" in dockerfile
    assert "USER 10001" in dockerfile
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert "/readyz" in " ".join(compose["services"]["receiver"]["healthcheck"]["test"])
    unit = (DEPLOY / "flespi-receiver.service").read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit
