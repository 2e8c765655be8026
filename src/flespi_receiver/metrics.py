"""Prometheus metrics: what operators alert on (traffic, outcomes, errors, a quiet stream)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import asyncpg
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

BATCH_SIZE_BUCKETS = (1, 10, 100, 500, 1000, 2000, 5000, 10000, 50000, 100000)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _PoolCollector(Collector):
    """Connections of the pool in use, read at scrape time."""

    def __init__(self) -> None:
        self.pool: asyncpg.Pool | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        in_use = GaugeMetricFamily(
            "flespi_receiver_db_connections_in_use", "PostgreSQL connections busy with a batch"
        )
        size = GaugeMetricFamily("flespi_receiver_db_connections", "PostgreSQL connections open")
        if self.pool is not None:
            in_use.add_metric([], self.pool.get_size() - self.pool.get_idle_size())
            size.add_metric([], self.pool.get_size())
        yield in_use
        yield size


class Metrics:
    """The receiver's metrics, in a registry of their own (one per application)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "flespi_receiver_requests",
            "Batch requests by stream and reply status",
            ["stream", "status"],
            registry=r,
        )
        self.messages = Counter(
            "flespi_receiver_messages",
            "Messages by outcome: stored, duplicate or rejected",
            ["stream", "outcome"],
            registry=r,
        )
        self.batch_size = Histogram(
            "flespi_receiver_batch_messages",
            "Messages per batch",
            ["stream"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "flespi_receiver_request_duration_seconds",
            "Time from request to reply",
            ["stream"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.database_errors = Counter(
            "flespi_receiver_database_errors",
            "Batches answered 503 because of PostgreSQL",
            ["stream", "kind"],
            registry=r,
        )
        self.auth_failures = Counter(
            "flespi_receiver_auth_failures",
            "Requests refused for their credentials",
            ["stream"],
            registry=r,
        )
        self.last_commit = Gauge(
            "flespi_receiver_last_commit_timestamp_seconds",
            "Unix time of the last batch committed, per stream (alert when it stops moving)",
            ["stream"],
            registry=r,
        )
        self.pool = _PoolCollector()
        r.register(self.pool)

    def batch_stored(
        self, stream: str, messages: int, stored: int, duplicates: int, rejected: int
    ) -> None:
        self.batch_size.labels(stream).observe(messages)
        for outcome, count in (
            ("stored", stored),
            ("duplicate", duplicates),
            ("rejected", rejected),
        ):
            self.messages.labels(stream, outcome).inc(count)
        self.last_commit.labels(stream).set(time.time())

    def render(self) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE}
        )
