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


def trusted(environment: dict[str, str]) -> list[str]:
    return list(orjson.loads(environment["FLESPI_RECEIVER_SERVER__TRUSTED_PROXIES"]))


def test_each_recipe_trusts_exactly_its_proxy_which_overwrites_the_client_address() -> None:
    nginx = (DEPLOY / "nginx.conf").read_text()
    assert "proxy_pass http://127.0.0.1:8080;" in nginx
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in nginx
    assert 'proxy_set_header Forwarded "";' in nginx
    unit = (DEPLOY / "flespi-receiver.service").read_text()
    assert """Environment='FLESPI_RECEIVER_SERVER__TRUSTED_PROXIES=["127.0.0.1/32"]'""" in unit
    assert "header_up -Forwarded" in (DEPLOY / "Caddyfile").read_text()
    recommended = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    caddy = recommended["caddy"]["networks"]["front"]["ipv4_address"]
    assert trusted(recommended["receiver"]["environment"]) == [f"{caddy}/32"]
    minimal = yaml.safe_load((DEPLOY.parent / "docker-compose.yml").read_text())
    gateway = minimal["networks"]["receiver"]["ipam"]["config"][0]["gateway"]
    assert trusted(minimal["services"]["receiver"]["environment"]) == [f"{gateway}/32"]


def test_file_descriptor_limits_allow_thousands_of_connections() -> None:
    unit = (DEPLOY / "flespi-receiver.service").read_text()
    limit = re.search(r"^LimitNOFILE=(\d+)$", unit, re.MULTILINE)
    assert limit
    assert int(limit[1]) >= 10_000
    for path in (DEPLOY / "docker-compose.yml", DEPLOY.parent / "docker-compose.yml"):
        receiver = yaml.safe_load(path.read_text())["services"]["receiver"]
        assert receiver["ulimits"]["nofile"]["soft"] >= 10_000, path
