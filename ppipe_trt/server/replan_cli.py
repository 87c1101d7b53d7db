"""``ppipe replan``: swap the plan of a running server (``POST /v2/plan``).

    ppipe replan --url http://127.0.0.1:8000 plan.json
    ppipe replan --url http://127.0.0.1:8000 --weights resnet50=3 --weights yolo=1

The server keeps serving: no request is lost, the report says what the swap did.  With an
auth token (``--auth-token`` or ``PPIPE_AUTH_TOKEN``) the request carries it.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from ppipe_trt.errors import BadInputError, PPipeError

AUTH_TOKEN_ENV = "PPIPE_AUTH_TOKEN"


def register(subparsers) -> None:
    p = subparsers.add_parser("replan", help="swap the plan of a running server",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("plan", nargs="?", type=Path, help="plan JSON to swap in")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (HTTP)")
    p.add_argument("--weights", action="append", default=[], metavar="MODEL=WEIGHT",
                   help="re-plan the cluster for these weights instead (repeatable; models "
                        "not named keep their weight)")
    p.add_argument("--reason", default=None, help="recorded in /v2/status")
    p.add_argument("--auth-token", default=None,
                   help=f"bearer token (default: ${AUTH_TOKEN_ENV})")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait")
    p.set_defaults(handler=replan_command)


def request_body(args) -> dict:
    if (args.plan is None) == (not args.weights):
        raise BadInputError("give a plan file or --weights MODEL=WEIGHT (one of the two)")
    if args.plan is not None:
        try:
            body = {"plan": json.loads(args.plan.read_text())}
        except OSError as exc:
            raise BadInputError(f"cannot read {args.plan}: {exc.strerror}") from None
        except ValueError as exc:
            raise BadInputError(f"{args.plan} is not JSON: {exc}") from None
    else:
        weights = {}
        for item in args.weights:
            model, sep, value = item.partition("=")
            try:
                weights[model.strip()] = float(value)
            except ValueError:
                sep = ""
            if not sep or not model.strip():
                raise BadInputError(f"--weights {item!r}; expected MODEL=WEIGHT, e.g. yolo=2")
        body = {"weights": weights}
    if args.reason:
        body["reason"] = args.reason
    return body


def replan_command(args) -> int:
    body = json.dumps(request_body(args)).encode()
    req = urllib.request.Request(args.url.rstrip("/") + "/v2/plan", data=body, method="POST",
                                 headers={"content-type": "application/json"})
    token = args.auth_token or os.environ.get(AUTH_TOKEN_ENV)
    if token:
        req.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as resp:
            report = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("error", "")
        except ValueError:
            detail = ""
        raise PPipeError(f"the server refused the plan (HTTP {exc.code}): {detail}") from None
    except urllib.error.URLError as exc:
        raise PPipeError(f"cannot reach {args.url}: {exc.reason}") from None
    print(f"plan generation {report['generation']} in force ({report['reason']}): "
          f"{len(report['workers_kept'])} workers kept, {len(report['workers_added'])} added, "
          f"{len(report['workers_retired'])} retiring; {report['requests_moved']} queued "
          f"requests moved, {report['batches_in_flight_at_switch']} batches in flight; "
          f"prepared in {report['prepare_s']:.3f} s, switched {report['switch_ms']:.1f} ms "
          "after the push", file=sys.stdout)
    return 0
