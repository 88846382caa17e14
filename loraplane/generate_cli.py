"""`loraplane generate`: stream a completion from a data plane to the terminal."""

from __future__ import annotations

import json
import sys

from google.protobuf.json_format import MessageToDict

from loraplane.admin_cli import add_connection_arguments, connect
from loraplane.v1 import generation_service_pb2 as gen_pb2

# SamplingParams.max_tokens when unset (generation_service.proto); the data plane applies it.
API_DEFAULT_MAX_TOKENS = 16


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="stream a completion from a data plane")
    # GenerationService takes no token, so none is sent unless given here: the admin token
    # (LORAPLANE_ADMIN_TOKEN) is the control plane's secret and never leaves for a data plane.
    add_connection_arguments(p, default_address="127.0.0.1:50052", address_env="LORAPLANE_DATA_PLANE",
                             token_help="bearer token to send (or --token-file); the data plane's GenerationService "
                                        "needs none, so none is sent by default; env LORAPLANE_ADMIN_TOKEN is not read")
    p.add_argument("prompt", help="prompt text")
    p.add_argument("--adapter", default="", help="adapter name or name@version (default: the base model)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help=f"tokens to generate (default: the API's, {API_DEFAULT_MAX_TOKENS})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--json", action="store_true", help="print every streamed message as a JSON line")
    p.set_defaults(func=run)


def run(args) -> int:
    with connect(args, token_env=None) as client:
        stream = client.generate(args.prompt, args.adapter, max_tokens=args.max_tokens,
                                 temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                 stop=args.stop, ignore_eos=args.ignore_eos, timeout=args.timeout)
        last = None
        for last in stream:
            if args.json:
                print(json.dumps(MessageToDict(last, preserving_proto_field_name=True)), flush=True)
            else:
                sys.stdout.write(last.text)
                sys.stdout.flush()
        if last is not None and not args.json:
            reason = gen_pb2.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
            print(f"\n[{reason}; {last.usage.prompt_tokens} prompt + {last.usage.completion_tokens} generated tokens"
                  f"{'; adapter ' + last.adapter_version[:19] if last.adapter_version else ''}]", file=sys.stderr)
    return 0
