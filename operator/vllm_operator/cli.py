"""The `vllm-operator` command: crd, render, docs, chart-schema, run."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, get_args

import yaml

from vllm_operator import api, chart_schema, crd, docs, model_ref, render
from vllm_operator.settings import OperatorSettings, SettingsError
from vllm_operator_client import bench_cli

EXIT_INVALID = 2


def _load_models(path: str) -> list[Any]:
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render_documents(documents: Sequence[Any], settings: OperatorSettings) -> list[dict[str, Any]]:
    """Manifests for every VLLMModel in `documents`; raises SpecError naming the bad one."""
    manifests: list[dict[str, Any]] = []
    for doc in documents:
        if not isinstance(doc, dict):
            raise api.SpecError([f"expected a {api.KIND} mapping, got a YAML {type(doc).__name__}"])
        if doc.get("apiVersion") != api.API_VERSION or doc.get("kind") != api.KIND:
            raise api.SpecError(
                [
                    f"{doc.get('kind')} {doc.get('apiVersion')}: "
                    f"expected kind {api.KIND} apiVersion {api.API_VERSION}"
                ]
            )
        meta = doc.get("metadata") or {}
        name = meta.get("name")
        if not name:
            raise api.SpecError(["metadata.name is required"])
        try:
            spec = api.parse_spec(doc.get("spec"))
        except api.SpecError as error:
            raise api.SpecError([f"{api.KIND}/{name}: {p}" for p in error.problems]) from None
        ref = render.ModelRef(name=name, namespace=meta.get("namespace", "default"), uid=meta.get("uid", ""))
        manifests.extend(render.children(ref, spec, settings))
    return manifests


def port(text: str) -> int:
    """A TCP port for argparse: refused with a clear message outside 0-65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port: use 0-65535")
    return value


def _settings() -> OperatorSettings | None:
    try:
        return OperatorSettings.from_env()
    except SettingsError as error:
        for problem in error.problems:
            print(f"error: {problem}", file=sys.stderr)
        return None


def cmd_render(args: argparse.Namespace) -> int:
    settings = _settings()
    if settings is None:
        return EXIT_INVALID
    try:
        manifests = render_documents(_load_models(args.filename), settings)
    except api.SpecError as error:
        for problem in error.problems:
            print(f"error: {args.filename}: {problem}", file=sys.stderr)
        return EXIT_INVALID
    except (OSError, yaml.YAMLError) as error:
        print(f"error: {args.filename}: {error}", file=sys.stderr)
        return EXIT_INVALID
    sys.stdout.write(yaml.safe_dump_all(manifests, sort_keys=False))
    return 0


def cmd_crd(_: argparse.Namespace) -> int:
    sys.stdout.write(crd.crd_yaml())
    return 0


def cmd_docs(args: argparse.Namespace) -> int:
    if args.readme:
        path = Path(args.readme)
        path.write_text(docs.splice(path.read_text()))
    else:
        print(docs.field_table())
    return 0


def cmd_chart_schema(args: argparse.Namespace) -> int:
    if args.values_schema:
        path = Path(args.values_schema)
        path.write_text(chart_schema.splice(path.read_text()))
    else:
        print(json.dumps(chart_schema.settings_values_schema(), indent=2))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import kopf

    import vllm_operator.handlers  # noqa: F401 - registers the handlers

    if not args.all_namespaces and not args.namespace:
        print("error: give --namespace NS (repeatable) or --all-namespaces", file=sys.stderr)
        return EXIT_INVALID
    if _settings() is None:  # refuse bad settings before connecting, not in a kopf handler
        return EXIT_INVALID
    kopf.configure(verbose=args.verbose)
    if args.metrics_port:
        from vllm_operator import metrics

        metrics.serve(args.metrics_port)
    kopf.run(
        standalone=True,
        clusterwide=args.all_namespaces,
        namespaces=args.namespace or (),
        liveness_endpoint=args.liveness,
    )
    return 0


def at_least(minimum: float, kind: type[int] | type[float] = int) -> Callable[[str], float]:
    """An argparse type: a number of `kind`, refused with a clear message below `minimum`."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a{'n integer' if kind is int else ' number'}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {kind(minimum)}")
        return value

    return parse


def _upstream(text: str) -> tuple[str, str]:
    name, sep, url = text.partition("=")
    if not sep or not name or not url:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=http://HOST:PORT")
    return name, url


def cmd_router(args: argparse.Namespace) -> int:
    from vllm_operator.router import serve, table

    if args.upstream and (args.namespace or args.all_namespaces or args.selector):
        print(
            "error: --upstream serves fixed URLs; it cannot be combined with --namespace/--selector",
            file=sys.stderr,
        )
        return EXIT_INVALID
    if not args.upstream and not args.all_namespaces and not args.namespace:
        print(
            "error: give --namespace NS (repeatable), --all-namespaces, or --upstream NAME=URL",
            file=sys.stderr,
        )
        return EXIT_INVALID
    try:
        table.static(args.upstream)  # refuse a bad URL before listening
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INVALID
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(message)s"
    )
    namespaces: list[str | None] = [None] if args.all_namespaces else list(args.namespace)
    serve.run(
        serve.Options(
            host=args.host,
            port=args.port,
            namespaces=namespaces,
            selector=args.selector,
            upstreams=args.upstream,
            strategy=args.strategy,
            max_body_bytes=args.max_body_bytes,
            grace_seconds=args.grace_seconds,
        )
    )
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="vllm-operator", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the operator against KUBECONFIG or the in-cluster config")
    p.add_argument("--namespace", "-n", action="append", default=[], help="watch this namespace (repeatable)")
    p.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace")
    p.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="liveness endpoint URL")
    p.add_argument("--metrics-port", type=port, default=9090, help="Prometheus /metrics port (0: off)")
    p.add_argument("--verbose", "-v", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("render", help="print the manifests of VLLMModels, like `helm template`")
    p.add_argument("-f", "--filename", required=True, help="a YAML file of VLLMModels, or - for stdin")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("crd", help="print the CustomResourceDefinition")
    p.set_defaults(func=cmd_crd)

    p = sub.add_parser("docs", help="print the resource field table (or update a README with --readme)")
    p.add_argument("--readme", help="README file whose generated table to rewrite")
    p.set_defaults(func=cmd_docs)

    p = sub.add_parser(
        "chart-schema",
        help="print the Helm chart's schema of its `settings` values (or update it with --values-schema)",
    )
    p.add_argument("--values-schema", help="values.schema.json whose properties.settings to rewrite")
    p.set_defaults(func=cmd_chart_schema)

    p = sub.add_parser("router", help="serve one OpenAI endpoint for every VLLMModel, routed by `model`")
    p.add_argument(
        "--namespace", "-n", action="append", default=[], help="serve this namespace's models (repeatable)"
    )
    p.add_argument("--all-namespaces", "-A", action="store_true", help="serve every namespace's models")
    p.add_argument("--selector", "-l", default="", help="label selector of the VLLMModels to serve")
    p.add_argument(
        "--upstream",
        action="append",
        default=[],
        type=_upstream,
        metavar="NAME=URL",
        help="serve model NAME from a fixed server URL instead of Kubernetes (repeatable)",
    )
    p.add_argument(
        "--strategy",
        choices=get_args(api.RoutingStrategy),
        default="LeastLoad",
        help="routing strategy of the --upstream routes",
    )
    p.add_argument("--host", default="0.0.0.0", help="address to listen on")
    p.add_argument(
        "--port", type=port, default=8000, help="port of the OpenAI endpoint, /metrics and /healthz"
    )
    p.add_argument(
        "--max-body-bytes", type=at_least(1), default=32 * 1024 * 1024, help="largest request body accepted"
    )
    p.add_argument(
        "--grace-seconds",
        type=at_least(0, float),
        default=30.0,
        help="on SIGTERM, how long open requests may finish",
    )
    p.add_argument("--verbose", "-v", action="store_true")
    p.set_defaults(func=cmd_router)

    bench_cli.register(sub, model_ref.resolve)  # `bench check|load` of the client distribution
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))
