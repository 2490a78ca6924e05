"""``sluice batch …``, ``sluice dlq …`` and ``sluice worker``: registered by ``proxy/cli.py``.

Exit codes: 0 done; 1 Sluice refused (its message on stderr, with Retry-After when it
gave one); 2 bad usage or unreadable file; 3 ``--wait`` saw records fail; 4 ``--wait`` saw
the batch cancelled before every record ran.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

import orjson

from proxy.jobs.client import ApiError, Client, progress_line, wait

COMMANDS = ("batch", "dlq", "worker")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url",
        default=os.environ.get("SLUICE_URL", "http://127.0.0.1:8080"),
        help="a Sluice instance (SLUICE_URL)",
    )
    p.add_argument(
        "--workload",
        default=os.environ.get("SLUICE_WORKLOAD"),
        help="sent as x-sluice-workload (header mode); keys from SLUICE_API_KEY or "
        "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY take precedence in Sluice",
    )


def _add_batch(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    batch = sub.add_parser("batch", help="durable batch jobs (Bedrock batch JSONL)")
    bs = batch.add_subparsers(dest="batch_command", required=True)
    submit = bs.add_parser("submit", help="queue a JSONL file; 202 means every record is durable")
    submit.add_argument("file")
    submit.add_argument("--model", required=True, help="model id for every record")
    submit.add_argument("--invocation-type", choices=("invoke", "converse"), default="invoke")
    submit.add_argument("--wait", action="store_true", help="show progress until it is done")
    _common(submit)
    for name, text in (
        ("status", "counts, oldest pending age, drain rate, ETA"),
        ("output", "output JSONL (partial while running) to stdout"),
        ("cancel", "drop the records still waiting"),
        ("delete", "delete a completed or cancelled batch: output, dead letters and all"),
    ):
        p = bs.add_parser(name, help=text)
        p.add_argument("batch_id")
        _common(p)
        if name == "output":
            p.add_argument("--manifest", help="also write manifest.json.out here")
    _common(bs.add_parser("list", help="this workload's batches"))


def _add_dlq(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dlq = sub.add_parser("dlq", help="dead-lettered batch records")
    ds = dlq.add_subparsers(dest="dlq_command", required=True)
    for name in ("list", "replay"):
        p = ds.add_parser(name, help=f"{name} dead letters (filters combine)")
        p.add_argument("--reason", help="e.g. ValidationException, retries_exhausted")
        p.add_argument("--batch", help="a batch id")
        if name == "replay":
            p.add_argument("--model", help="send the replayed records to this model id instead")
        _common(p)
    show = ds.add_parser("show", help="one dead letter with its input and upstream error")
    show.add_argument("dlq_id")
    _common(show)
    discard = ds.add_parser(
        "discard",
        help="drop dead letters for good (their records keep their error lines): one by id, "
        "else every one matching the filters",
    )
    discard.add_argument("dlq_id", nargs="?")
    discard.add_argument("--reason", help="e.g. ValidationException, retries_exhausted")
    discard.add_argument("--batch", help="a batch id")
    _common(discard)


def _add_worker(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    w = sub.add_parser("worker", help="drain batch queues without serving Bedrock calls")
    w.add_argument("--config", default=os.environ.get("SLUICE_CONFIG"))
    w.add_argument("--redis-url", default=os.environ.get("SLUICE_REDIS_URL"))
    w.add_argument(
        "--fleet",
        default=os.environ.get("SLUICE_FLEET"),
        help="with --redis-url: drain this fleet's queue under its stored policy "
        "(SLUICE_FLEET); without it, the default fleet's queue under --config",
    )
    w.add_argument("--upstream", default=os.environ.get("SLUICE_UPSTREAM"))
    w.add_argument("--region", default=os.environ.get("SLUICE_REGION"))
    w.add_argument("--log-level", default=os.environ.get("SLUICE_LOG_LEVEL", "INFO"))


def add_job_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``batch``, ``dlq`` and ``worker``."""
    _add_batch(sub)
    _add_dlq(sub)
    _add_worker(sub)


def run_job_command(args: argparse.Namespace) -> int:
    """Run one of :data:`COMMANDS`."""
    if args.command == "worker":
        return _worker(args)
    client = Client(args.url, args.workload)
    try:
        if args.command == "batch":
            return _batch(client, args)
        return _dlq(client, args)
    except ApiError as exc:
        hint = f" (Retry-After: {exc.retry_after} s)" if exc.retry_after else ""
        print(f"sluice: {exc}{hint}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"sluice: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1


def _print(doc: object) -> None:
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")


def _batch(client: Client, args: argparse.Namespace) -> int:
    cmd = args.batch_command
    if cmd == "submit":
        return _submit(client, args)
    if cmd == "list":
        _print(client.json("GET", "/batches"))
    elif cmd == "status":
        status = client.json("GET", f"/batches/{args.batch_id}")
        _print(status)
        print(progress_line(status), file=sys.stderr)
    elif cmd == "cancel":
        _print(client.json("POST", f"/batches/{args.batch_id}/cancel"))
    elif cmd == "delete":
        _print(client.json("DELETE", f"/batches/{args.batch_id}"))
    else:
        sys.stdout.buffer.write(client.request("GET", f"/batches/{args.batch_id}/output"))
        if args.manifest:
            status = client.json("GET", f"/batches/{args.batch_id}")
            Path(args.manifest).write_bytes(orjson.dumps(status["manifest"]))
    return 0


def _submit(client: Client, args: argparse.Namespace) -> int:
    try:
        body = Path(args.file).read_bytes()
    except OSError as exc:
        print(f"{args.file}: cannot read: {exc.strerror or exc}", file=sys.stderr)
        return 2
    params = {"modelId": args.model, "invocationType": args.invocation_type}
    accepted = orjson.loads(client.request("POST", "/batches", params, body))
    print(accepted["batchId"])
    sys.stdout.flush()
    if not args.wait:
        return 0
    final = wait(client, accepted["batchId"])
    if final["status"] == "cancelled":
        # A script running `submit --wait && publish` must not publish half a batch.
        done = final["succeeded"] + final["failed"]
        print(
            f"{accepted['batchId']}: cancelled with {done} of {final['records']} records done",
            file=sys.stderr,
        )
        return 4
    return 3 if final["failed"] else 0


def _dlq(client: Client, args: argparse.Namespace) -> int:
    if args.dlq_command == "show":
        _print(client.json("GET", f"/dlq/{args.dlq_id}"))
        return 0
    params = {"reason": args.reason, "batch": args.batch}
    if args.dlq_command == "discard":
        return _discard(client, args, params)
    if args.dlq_command == "list":
        _print(client.json("GET", "/dlq", params))
    else:
        params["modelId"] = args.model
        _print(client.json("POST", "/dlq/replay", params))
    return 0


def _discard(client: Client, args: argparse.Namespace, params: dict[str, str | None]) -> int:
    if args.dlq_id is None:
        _print(client.json("POST", "/dlq/discard", params))
        return 0
    if args.reason or args.batch:
        # Filters next to an id would read as "this one, if it matches": refuse the doubt.
        print("sluice dlq discard: give a dead-letter id or filters, not both", file=sys.stderr)
        return 2
    _print(client.json("DELETE", f"/dlq/{args.dlq_id}"))
    return 0


def _worker(args: argparse.Namespace) -> int:
    """The app's lifecycle (store, upstream, controllers, jobs) without a listening socket."""
    from aiohttp import web

    from proxy.app import Settings, build_app
    from proxy.config import PolicyError, load_policy
    from proxy.log import setup_logging

    setup_logging(args.log_level)
    try:
        policy = load_policy(args.config)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 2
    fleet = (args.fleet or None) if args.redis_url else None
    # The file goes with the settings too: a worker that is the first of its fleet publishes
    # it (without it, the demo default policy would become the fleet's).
    settings = Settings(
        upstream=args.upstream,
        redis_url=args.redis_url,
        region=args.region,
        fleet=fleet,
        config=args.config,
    )

    async def run() -> None:
        runner = web.AppRunner(build_app(policy, settings))
        await runner.setup()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print("sluice worker draining batch queues", file=sys.stderr, flush=True)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(run())
    return 0
