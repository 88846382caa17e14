"""`loraplane adapters ...`: the registry from the command line."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from google.protobuf.json_format import MessageToDict

from loraplane.auth import load_token
from loraplane.client import Client
from loraplane.v1 import adapter_pb2

DEFAULT_ADDRESS = "127.0.0.1:50051"
ADMIN_TOKEN_ENV = "LORAPLANE_ADMIN_TOKEN"


def add_connection_arguments(p: argparse.ArgumentParser, default_address: str = DEFAULT_ADDRESS,
                             address_env: str = "LORAPLANE_ADDRESS", *, again: bool = False,
                             token_help: str | None = None) -> None:
    """The flags every client command takes. again=True adds them a second time, to a subcommand,
    with no defaults: given there they win, and left out they keep the parent command's values.
    token_help replaces the --token help (for a command whose connect() reads no token env var)."""

    def default(value):
        return argparse.SUPPRESS if again else value

    p.add_argument("--address", default=default(os.environ.get(address_env, default_address)),
                   help=f"server address (env {address_env}, default {default_address})")
    p.add_argument("--token", default=default(None),
                   help=token_help or f"bearer token (or --token-file, or env {ADMIN_TOKEN_ENV}, in that order)")
    p.add_argument("--token-file", type=Path, default=default(None), help="file holding the bearer token")
    p.add_argument("--tls", action="store_true", default=default(False), help="use TLS (system roots unless --ca-cert)")
    p.add_argument("--ca-cert", type=Path, default=default(None), help="CA certificate to trust (PEM); implies --tls")
    p.add_argument("--client-cert", type=Path, default=default(None),
                   help="client certificate (PEM) for a server that requires mTLS; needs --client-key, implies --tls")
    p.add_argument("--client-key", type=Path, default=default(None), help="private key (PEM) of --client-cert")
    p.add_argument("--timeout", type=float, default=default(60.0),
                   help="per-call deadline in seconds (register --wait has none: it waits for READY or the failure)")


def connect(args, token_env: str | None = ADMIN_TOKEN_ENV) -> Client:
    """A Client for the connection flags; ValueError (the CLI's exit 2) for flags that cannot work.
    The token is --token, else --token-file, else env `token_env` (None: no env var is read)."""
    if bool(args.client_cert) != bool(args.client_key):
        raise ValueError("--client-cert and --client-key go together")
    try:
        token = load_token(args.token, token_env, args.token_file)
        ca = args.ca_cert.read_bytes() if args.ca_cert else None
        pair = (args.client_key.read_bytes(), args.client_cert.read_bytes()) if args.client_cert else None
    except OSError as e:
        raise ValueError(f"cannot read {e.filename}: {e.strerror}") from None
    return Client(args.address, token, tls=args.tls or ca is not None or pair is not None, root_certificates=ca,
                  client_cert=pair, timeout=args.timeout)


def add_parser(sub) -> None:
    p = sub.add_parser("adapters", help="register, list, pin and delete adapters")
    add_connection_arguments(p)
    json_help = "print JSON instead of tables"
    p.add_argument("--json", action="store_true", help=json_help)
    # The same flags after the command too: `adapters list --json` as well as `adapters --json list`.
    common = argparse.ArgumentParser(add_help=False)
    add_connection_arguments(common, again=True)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=json_help)
    cmds = p.add_subparsers(dest="adapters_cmd", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return cmds.add_parser(name, help=help, parents=[common])

    r = command("register", "register an adapter from a local path, hf:// or s3:// source")
    r.add_argument("name")
    r.add_argument("source", help="/abs/path, file:///abs/path, hf://org/repo[@rev] or s3://bucket/prefix")
    r.add_argument("--revision", default="", help="Hub branch, tag or commit")
    r.add_argument("--wait", action="store_true", help="wait until READY (or the failure)")
    r.add_argument("--pin", action="store_true", help="pin it once registered")
    r.add_argument("--base-model", default="", help="refuse unless the control plane serves this base model")
    g = command("get", "show one adapter")
    g.add_argument("name")
    ls = command("list", "list adapters")
    ls.add_argument("--state", choices=[s.removeprefix("ADAPTER_STATE_").lower() for s in adapter_pb2.AdapterState.keys()
                                        if s != "ADAPTER_STATE_UNSPECIFIED"])
    for verb in ("delete", "pin", "unpin"):
        c = command(verb, f"{verb} an adapter")
        c.add_argument("name")
        c.add_argument("--etag", default="", help="only if the adapter still has this etag")
    w = command("watch", "stream registry events (Ctrl-C to stop)")
    w.add_argument("--after", default="", help="resume after this event id (0 = all retained)")
    w.add_argument("--limit", type=int, default=0, help="stop after this many events (0 = never)")
    p.set_defaults(func=run)


def _short(version: str) -> str:
    return version.removeprefix("sha256:")[:12]


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_table(rows: list[list[str]], header: list[str], out=None) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip(), file=out)


def _adapter_rows(adapters) -> list[list[str]]:
    return [[a.name, adapter_pb2.AdapterState.Name(a.state).removeprefix("ADAPTER_STATE_"), _short(a.version) or "-",
             str(a.rank or "-"), ",".join(a.target_modules) or "-", _size(a.size_bytes) if a.size_bytes else "-",
             "yes" if a.pinned else "", a.failure_message[:60]] for a in adapters]


HEADER = ["NAME", "STATE", "VERSION", "RANK", "MODULES", "SIZE", "PINNED", "MESSAGE"]


def _emit(args, adapters) -> None:
    if args.json:
        print(json.dumps([MessageToDict(a, preserving_proto_field_name=True) for a in adapters], indent=2))
    else:
        print_table(_adapter_rows(adapters), HEADER)


def run(args) -> int:
    with connect(args) as client:
        cmd = args.adapters_cmd
        if cmd == "register":
            a = client.create_adapter(args.name, args.source, revision=args.revision, wait=args.wait,
                                      pinned=args.pin, base_model=args.base_model,
                                      timeout=None if args.wait else args.timeout)
            _emit(args, [a])
        elif cmd == "get":
            _emit(args, [client.get_adapter(args.name)])
        elif cmd == "list":
            _emit(args, list(client.list_adapters(state=args.state)))
        elif cmd == "delete":
            client.delete_adapter(args.name, args.etag)
            print(json.dumps({"deleted": args.name}) if args.json else f"deleted {args.name}")
        elif cmd in ("pin", "unpin"):
            fn = client.pin_adapter if cmd == "pin" else client.unpin_adapter
            _emit(args, [fn(args.name, args.etag)])
        elif cmd == "watch":
            for seen, event in enumerate(client.watch_adapters(args.after), 1):
                kind = adapter_pb2.AdapterEventType.Name(event.type).removeprefix("ADAPTER_EVENT_TYPE_")
                if args.json:
                    print(json.dumps(MessageToDict(event, preserving_proto_field_name=True)), flush=True)
                else:
                    print(f"{event.event_id}  {kind:<9} {event.name}  {_short(event.version)}", flush=True)
                if seen == args.limit:
                    break
    return 0
