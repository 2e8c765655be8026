"""`flespi-receiver bench`: the receiver against raw COPY and a naive receiver, on one database."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
from pathlib import Path

from flespi_receiver.cli.arguments import integer
from flespi_receiver.cli.common import EXIT_OK, Subcommands, add_command
from flespi_receiver.errors import CommandFailed
from flespi_receiver.identity import IDENTITIES
from flespi_receiver.spellings import SPELLINGS

DEFAULT_DATA_DIR = Path(".data/bench-postgres")


def register(commands: Subcommands) -> None:
    bench = add_command(
        commands,
        "bench",
        "measure the receiver against raw COPY and a naive receiver, on one database",
        run,
        config=False,
    )
    bench.add_argument("--database-url", help="an existing server (default: embedded)")
    bench.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        type=Path,
        help="embedded server folder (default: %(default)s); removed at the end unless --keep "
        "or it held something before this run",
    )
    bench.add_argument(
        "--keep", action="store_true", help="keep the embedded server's folder at the end"
    )
    bench.add_argument("--count", type=int, default=20000, help="messages per run")
    bench.add_argument(
        "--batch-size",
        type=int,
        action="append",
        dest="batch_sizes",
        help="messages per batch; repeat for several (default: 1000)",
    )
    bench.add_argument("--gzip", action="store_true", help="gzip the request bodies")
    bench.add_argument(
        "--spelling",
        choices=(*SPELLINGS, "bom", "all"),
        action="append",
        dest="spellings",
        help="how the receivers' bodies spell the JSON: compact (as orjson writes it), spaced "
        "(json.dumps defaults), escaped (non-ASCII as \\uXXXX, / as \\/), pretty (indented), "
        "numbers (floats as 1.50 or 1E-07, zero as -0), bom (compact, the body starting with "
        "a UTF-8 byte order mark); COPY gets the same rows whatever the spelling (default: "
        "compact). Repeat it, or say all, to compare spellings in one run: their turns "
        "interleaved round by round, each one's rate as a fraction of compact's",
    )
    bench.add_argument(
        "--identity",
        choices=IDENTITIES,
        default="text",
        help="the receiver's stream keys messages by their text as sent, or by their content "
        'however spelled (identity = "content", what backfill needs) (default: %(default)s)',
    )
    bench.add_argument(
        "--rows-only",
        action="store_const",
        const="rows-only",
        dest="configuration",
        default="default",
        help="the receiver stores rows only, like COPY (default: the default configuration, "
        "with device_state and NOTIFY)",
    )
    bench.add_argument(
        "--merge",
        action="store_const",
        const="merge",
        dest="configuration",
        help="device_state in merge mode (device_state_merge = true), with NOTIFY",
    )
    bench.add_argument(
        "--devices",
        type=int,
        default=5000,
        help="distinct devices the messages come from, in turn: a batch holds "
        "min(batch size, devices) of them (default: %(default)s)",
    )
    bench.add_argument(
        "--bad-every",
        type=integer(1),
        metavar="N",
        help="also the receiver, in the same rounds, on the same messages with one in N made "
        "invalid (a duplicate key) on a stream of its own: N = batch size is one bad message "
        "per batch",
    )
    bench.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="runs of each contender; the median is reported (default: 3)",
    )
    bench.add_argument(
        "--growth",
        type=int,
        metavar="ROWS",
        help="instead: the receiver's rate as the table grows to ROWS rows",
    )
    bench.add_argument("--growth-step", type=int, default=1_000_000, metavar="ROWS")
    bench.add_argument(
        "--memory",
        type=int,
        metavar="MESSAGES",
        help="instead: peak RSS while ingesting MESSAGES, then one body of --max-body-size",
    )
    bench.add_argument("--max-body-size", type=int, default=64 * 1024 * 1024)
    bench.add_argument(
        "--memory-shapes",
        type=int,
        metavar="BYTES",
        help="instead: peak RSS of one body of about BYTES per shape (huge string, huge array, "
        "20 000 keys, deep nesting, quarantined content, tiny messages), each in a fresh "
        "receiver",
    )
    bench.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="TEXT",
        help="with --memory-shapes: only the shapes whose names contain TEXT (repeatable)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        if args.database_url:
            asyncio.run(_bench_on(args.database_url, args))
        else:
            _bench_embedded(args)
    except RuntimeError as exc:  # a batch never acknowledged, a receiver that did not start
        raise CommandFailed(str(exc)) from None
    return EXIT_OK


def _bench_embedded(args: argparse.Namespace) -> None:
    """On an embedded server in --data-dir, removed at the end unless --keep; a folder given
    by the user that held something before is kept whatever happens."""
    from flespi_receiver.embedded import EmbeddedPostgres

    data_dir: Path = args.data_dir
    ours = data_dir == DEFAULT_DATA_DIR or not data_dir.exists() or not any(data_dir.iterdir())
    remove = ours and not args.keep
    print(
        f"benchmark database: embedded PostgreSQL in {data_dir.resolve()} "
        + ("(removed at the end; --keep keeps it)" if remove else "(kept)"),
        file=sys.stderr,
    )
    server = EmbeddedPostgres(data_dir)
    started = False
    try:
        with server as url:
            started = True
            asyncio.run(_bench_on(url, args))
    finally:
        if remove and started:
            shutil.rmtree(data_dir, ignore_errors=True)
            server.owner_file.unlink(missing_ok=True)
            print(f"removed {data_dir.resolve()}", file=sys.stderr)


async def _bench_on(url: str, args: argparse.Namespace) -> None:
    from flespi_receiver import bench, bench_scale

    sizes = args.batch_sizes or [1000]
    if args.growth:
        await bench_scale.growth_curve(url, args.growth, args.growth_step, sizes[0], args.count)
    elif args.memory_shapes:
        from flespi_receiver import bench_shapes

        await bench_shapes.memory_by_shape(url, args.memory_shapes, tuple(args.shape))
    elif args.memory:
        await bench_scale.memory_profile(url, args.memory, args.max_body_size)
    else:
        spellings = _spellings(args.spellings)
        workload = bench.Workload(
            configuration=args.configuration,
            devices=args.devices,
            gzip_level=6 if args.gzip else None,
            spelling=next((s for s in SPELLINGS if s == spellings[0]), "compact"),
            identity=args.identity,
            bad_every=args.bad_every,
        )
        if len(spellings) > 1 or spellings[0] == "bom":
            from flespi_receiver import bench_spelling

            await bench_spelling.run_spelling_benchmark(
                url, spellings, sizes[0], args.count, workload, args.rounds
            )
        else:
            await bench.run_benchmark(url, sizes, args.count, workload, args.rounds)


def _spellings(chosen: list[str] | None) -> list[str]:
    """The spellings asked for, each once, in SPELLINGS' order, bom last; compact when none."""
    if not chosen:
        return ["compact"]
    return [s for s in (*SPELLINGS, "bom") if s in chosen or "all" in chosen]
