"""Where a batch's time goes: `flespi-receiver bench` with each step of each batch timed.

    .venv/bin/python bench/timeline.py [bench arguments]
    e.g. bench/timeline.py --count 20000 --batch-size 1000 --rounds 1 --devices 1000 \
             --database-url postgresql://postgres:...@127.0.0.1:5432/postgres

Runs the usual benchmark (one database named `flespi_bench_timeline`), but starts the receiver
through this file, which wraps a few of its functions to note `time.perf_counter()`
(CLOCK_MONOTONIC, the same clock in every process of the machine) at each step of a batch:
the handler's start, BEGIN, the session limits of a streamed body, the COPY (the first and the
last chunk of its data made, PostgreSQL's answer), the finishing statement (device_state and
NOTIFY), COMMIT and the handler's end; with the receiver's CPU time (all threads) and that
of its PostgreSQL backend (/proc/PID/schedstat) per batch, and the CPU time spent making the
COPY data. The bench process notes when each POST starts and when its reply is read, and
times each COPY of the reference with its backend's CPU time. Prints the median of each step
over the receiver's batches (a developer's tool: it reaches into the receiver's internals,
which is why it is not part of the installed package).
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from flespi_receiver.bench_spelling import cpu_seconds

OUT = "FLESPI_TIMELINE_OUT"
now = time.perf_counter
batch: dict[str, Any] = {}
batches: list[dict[str, Any]] = []


def note(name: str) -> None:
    batch.setdefault(name, now())


def receiver() -> None:
    """The receiver (`serve`), its steps noted per batch, written out at exit."""
    import asyncpg
    import asyncpg.transaction

    from flespi_receiver import ingest, store
    from flespi_receiver.cli import main

    def wrap(owner: Any, name: str, before: str, after: str) -> None:
        original = getattr(owner, name)

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            note(before)
            try:
                return await original(*args, **kwargs)
            finally:
                note(after)

        setattr(owner, name, wrapper)

    handle = ingest.StreamEndpoint.handle

    async def timed_handle(self: Any, request: Any) -> Any:
        global batch
        batch = {"handler": now(), "cpu0": cpu_seconds(os.getpid())}
        execute_statement[0] = False
        try:
            return await handle(self, request)
        finally:
            batch["handler_end"] = now()
            batch["cpu"] = cpu_seconds(os.getpid()) - batch.pop("cpu0")
            if "backend" in batch:
                batch["backend_cpu"] = cpu_seconds(batch["backend"]) - batch.pop("backend0")
            batches.append(batch)

    ingest.StreamEndpoint.handle = timed_handle  # type: ignore[method-assign]
    transaction = asyncpg.transaction.Transaction
    start = transaction.start

    async def timed_start(self: Any) -> None:
        if "backend" not in batch:
            batch["backend"] = self._connection.get_server_pid()
            batch["backend0"] = cpu_seconds(batch["backend"])
        note("begin")
        await start(self)
        note("begun")

    transaction.start = timed_start  # type: ignore[method-assign]
    commit = transaction._Transaction__commit  # type: ignore[attr-defined]

    async def timed_commit(self: Any) -> None:
        if self._nested:
            return await commit(self)  # type: ignore[no-any-return]
        note("commit")
        await commit(self)
        note("committed")
        return None

    transaction._Transaction__commit = timed_commit  # type: ignore[attr-defined]
    wrap(store, "bound_streamed", "bound", "bound_done")
    copy_to_table = asyncpg.Connection.copy_to_table

    async def timed_copy(self: Any, *args: Any, **kwargs: Any) -> Any:
        note("copy")
        if hasattr(kwargs.get("source"), "__anext__"):
            kwargs["source"] = timed_source(kwargs["source"])
        status = await copy_to_table(self, *args, **kwargs)
        note("copy_done")
        execute_statement[0] = True  # the next execute is the finishing statement
        return status

    async def timed_source(source: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        making = 0.0
        while True:
            started = time.thread_time()
            try:
                chunk = await source.__anext__()
            except StopAsyncIteration:
                break
            making += time.thread_time() - started
            note("first_chunk")
            batch["last_chunk"] = now()
            batch["making_cpu"] = making
            yield chunk

    asyncpg.Connection.copy_to_table = timed_copy  # type: ignore[method-assign]
    execute = asyncpg.Connection.execute
    execute_statement = [False]

    async def timed_execute(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        finishing = execute_statement[0] and args
        execute_statement[0] = False
        if finishing:
            note("finish")
        result = await execute(self, query, *args, **kwargs)
        if finishing:
            note("finish_done")
        return result

    asyncpg.Connection.execute = timed_execute  # type: ignore[method-assign]

    def write() -> None:
        with open(f"{os.environ[OUT]}.receiver.{os.getpid()}", "w") as f:
            json.dump(batches, f)

    atexit.register(write)
    sys.argv = ["flespi-receiver", *sys.argv[2:]]
    sys.exit(main())


STEPS: list[tuple[str, Callable[[dict[str, Any], dict[str, Any]], float]]] = [
    ("POST sent -> handler starts", lambda c, r: r["handler"] - c["start"]),
    ("handler -> BEGIN", lambda c, r: r["begin"] - r["handler"]),
    ("BEGIN", lambda c, r: r["begun"] - r["begin"]),
    ("session limits of a streamed body", lambda c, r: r["bound_done"] - r["bound"]),
    ("COPY sent -> first chunk of data made", lambda c, r: r["first_chunk"] - r["copy"]),
    (
        "first -> last chunk made (body read, split, judged, encoded)",
        lambda c, r: r["last_chunk"] - r["first_chunk"],
    ),
    ("last chunk made -> PostgreSQL's COPY answer", lambda c, r: r["copy_done"] - r["last_chunk"]),
    ("COPY answer -> finishing statement sent", lambda c, r: r["finish"] - r["copy_done"]),
    ("finishing statement (device_state, NOTIFY)", lambda c, r: r["finish_done"] - r["finish"]),
    ("COMMIT", lambda c, r: r["committed"] - r["commit"]),
    ("committed -> handler returns", lambda c, r: r["handler_end"] - r["committed"]),
    ("handler returns -> reply read by the sender", lambda c, r: c["end"] - r["handler_end"]),
    ("POST sent -> reply read (the sender's wait)", lambda c, r: c["end"] - c["start"]),
    ("receiver CPU (all threads)", lambda c, r: r["cpu"]),
    ("  of which making the COPY data", lambda c, r: r["making_cpu"]),
    ("its PostgreSQL backend's CPU", lambda c, r: r["backend_cpu"]),
]


def report(out: str) -> None:
    with open(out + ".bench") as f:
        sender = json.load(f)
    received: list[dict[str, Any]] = []
    for name in glob.glob(out + ".receiver.*"):
        with open(name) as f:
            received += json.load(f)
    pairs = []
    for post in sender["posts"]:
        for done in received:
            if post["start"] <= done["handler"] <= post["end"] and "copy" in done:
                pairs.append((post, done))
                break
    print(f"\nreceiver: {len(pairs)} batches stored by COPY; medians, ms per batch")
    for name, step in STEPS:
        values = []
        for post, done in pairs:
            with contextlib.suppress(KeyError):  # a step the batch did not take
                values.append(step(post, done))
        if values:
            print(f"  {name:<62} {statistics.median(values) * 1000:8.2f}")
    copies = sender["copies"]
    print(f"COPY reference: {len(copies)} batches; medians, ms per batch")
    wall = statistics.median(c["wall"] for c in copies) * 1000
    cpu = statistics.median(c["backend_cpu"] for c in copies) * 1000
    print(f"  {'BEGIN, COPY, COMMIT':<62} {wall:8.2f}")
    print(f"  {'its PostgreSQL backend CPU':<62} {cpu:8.2f}")


def benchmark() -> None:
    """The bench process: the receiver started through this file, the sender's and the
    reference's times noted."""
    from flespi_receiver import bench, emulator
    from flespi_receiver.cli import main

    bench.BENCH_DATABASE = "flespi_bench_timeline"
    out = os.environ.setdefault(OUT, os.path.join(tempfile.mkdtemp(prefix="timeline-"), "run"))
    process = bench.process

    def through_here(command: list[str], env: dict[str, str] | None = None) -> Any:
        if command[1:3] == ["-m", "flespi_receiver"]:
            command = [command[0], __file__, "--receiver", *command[3:]]
        return process(command, env)

    bench.process = through_here  # type: ignore[assignment]
    posts: list[dict[str, float]] = []
    deliver = emulator.StreamEmulator.deliver

    async def timed_deliver(self: Any, session: Any, messages: Any, *body: Any) -> None:
        started = now()
        await deliver(self, session, messages, *body)
        if self.url.endswith("/flespi"):
            posts.append({"start": started, "end": now()})

    emulator.StreamEmulator.deliver = timed_deliver  # type: ignore[method-assign]
    copies: list[dict[str, float]] = []
    copy_batch = bench.copy_batch

    async def timed_copy_batch(conn: Any, data: bytes) -> None:
        backend = conn.get_server_pid()
        cpu, started = cpu_seconds(backend), now()
        await copy_batch(conn, data)
        copies.append({"wall": now() - started, "backend_cpu": cpu_seconds(backend) - cpu})

    bench.copy_batch = timed_copy_batch  # type: ignore[assignment]
    sys.argv = ["flespi-receiver", "bench", *sys.argv[1:]]
    try:
        main()
    finally:
        with open(out + ".bench", "w") as f:
            json.dump({"posts": posts, "copies": copies}, f)
    report(out)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--receiver"]:
        receiver()
    else:
        benchmark()
