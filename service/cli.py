"""``deit-serve`` / ``python -m service``: flags and DEIT_* variables → Settings → uvicorn."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import typing
from collections.abc import Sequence
from typing import Any

import uvicorn
from pydantic import ValidationError

from service.app import create_app
from service.errors import MissingExtra
from service.http.limits import HttpLimits
from service.http.server import ANSWER_GRACE_S, DrainingServer
from service.logs import configure_logging
from service.settings import Settings

log = logging.getLogger("deit_serve.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deit-serve",
        description="Serve DeiT image classifiers over HTTP with dynamic batching. Every flag can also be set as "
        "an environment variable DEIT_<NAME> (e.g. DEIT_MAX_BATCH_SIZE=16); flags win.",
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.default if not isinstance(field.default, tuple) else ",".join(field.default)
        help_text = f"{field.description or ''} [env DEIT_{name.upper()}; default: {default}]"
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif name == "model":  # repeatable: one model per flag
            parser.add_argument(flag, dest=name, action="append", default=None, help=help_text, metavar="ID")
        else:
            choices = (
                typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal else None
            )
            parser.add_argument(flag, dest=name, default=None, choices=choices, help=help_text, metavar=name.upper())
    parser.add_argument(
        "--download-only",
        action="store_true",
        help="fetch the --model hub ids into the hub cache (HF_HOME/HF_HUB_CACHE) and exit: fills the cache of an "
        "air-gapped deployment",
    )
    return parser


def parse_command(argv: Sequence[str] | None = None) -> tuple[Settings, bool]:
    """The settings (flags over ``DEIT_*`` over defaults), and whether ``--download-only`` was asked for."""
    args = vars(_parser().parse_args(argv))
    fetch_only = bool(args.pop("download_only"))
    overrides: dict[str, Any] = {k: v for k, v in args.items() if v is not None}
    if isinstance(overrides.get("model"), list):
        overrides["model"] = tuple(overrides["model"])
    return Settings(**overrides), fetch_only


def download_only(settings: Settings) -> int:
    """Resolve each --model into the hub cache; one JSON line per model (its snapshot and commit), 0 when all are."""
    from service.engine.repository import hub_models
    from service.errors import ServiceError
    from service.model.hub import HubError, resolve

    try:
        models = hub_models(settings.model)
    except ServiceError as e:
        print(json.dumps({"error": e.message}), file=sys.stderr)
        return 2
    if not models:
        print(json.dumps({"error": "--download-only needs at least one --model REPO_ID"}), file=sys.stderr)
        return 2
    failed = 0
    for name, ref in models.items():
        try:
            snapshot = resolve(ref)
        except HubError as e:
            print(json.dumps({"model": name, "error": e.message, **e.fields()}), file=sys.stderr)
            failed += 1
            continue
        print(json.dumps({"model": name, "hub_id": str(ref), "revision": snapshot.commit, "path": str(snapshot.path)}))
    return 1 if failed else 0


def http_options(settings: Settings) -> dict[str, Any]:
    """The HTTP protocol for uvicorn: httptools with every limit, or, without httptools, h11 with those it has."""
    limits = HttpLimits(
        max_header_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers,
        header_timeout_s=settings.header_timeout_s,
        max_connections=settings.max_connections,
    )
    try:
        import httptools  # noqa: F401
    except ImportError:
        log.warning(
            "httptools is not installed (pip install 'deit-serve[fast]'): serving with h11, which bounds what it "
            "holds of a request head but not its header count or its time, and answers parser errors and the "
            "connection limit in text/plain"
        )
        return {
            "http": "h11",
            "h11_max_incomplete_event_size": limits.max_header_bytes,
            "limit_concurrency": limits.max_connections,
        }
    from service.http.protocol import limited_protocol

    return {"http": limited_protocol(limits)}


def main(argv: Sequence[str] | None = None) -> None:
    try:
        settings, fetch_only = parse_command(argv)
    except ValidationError as e:
        for err in e.errors():
            where = ".".join(str(x) for x in err["loc"]) or "settings"
            print(f"deit-serve: invalid setting {where}: {err['msg']}", file=sys.stderr)
        sys.exit(2)
    configure_logging(settings.log_level)
    # gRPC's native core writes its own plain-text lines to stderr (a port it cannot bind, say) beside the service's
    # JSON lines, which already report what the service makes of them; an operator who wants them sets it.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    if fetch_only:
        sys.exit(download_only(settings))
    server: DrainingServer | None = None

    def on_fatal() -> None:
        if server is not None:
            server.fail()

    try:
        app = create_app(settings, on_fatal=on_fatal)
    except MissingExtra as e:
        print(f"deit-serve: {e.message}", file=sys.stderr)
        sys.exit(2)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=ANSWER_GRACE_S,
        loop="auto",
        ws="none",
        timeout_keep_alive=settings.keep_alive_timeout_s,
        backlog=settings.backlog,
        **http_options(settings),
    )
    server = DrainingServer(config, app.state.lifecycle, settings.drain_timeout_s)
    server.run()
    exit_process(server.exit_code)


def exit_process(code: int) -> typing.NoReturn:
    """Exit once the server has stopped, whatever a thread is still doing. A model load abandoned at its timeout
    or by the drain may run a warm-up for hours on its thread and torch's pool (threads a normal interpreter exit
    may wait for); the server has answered every request and holds nothing that needs writing back, so nothing waits."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
