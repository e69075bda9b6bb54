"""The ``aiaas`` command line: render, validate, crds, run (local), serve, operator."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

import yaml

from aiaas import __version__

from . import crdgen, load
from .render import RenderSettings, ServicePlan, render_inferenceservice, render_trainingjob
from .render.settings import DEFAULT_IMAGE
from .render.trainingjob import artifact_uri


def _settings(args: argparse.Namespace) -> RenderSettings:
    return RenderSettings(trainer_image=args.image, server_image=args.image)


def cmd_render(args: argparse.Namespace) -> int:
    items = [item.obj for item in load.load_file(args.filename)]
    for obj in items:
        if args.namespace and not obj.metadata.namespace:
            obj.metadata.namespace = args.namespace
    jobs = {o.metadata.name: o for o in items if isinstance(o, load.api.TrainingJob)}
    manifests = []
    for obj in items:
        if isinstance(obj, load.api.TrainingJob):
            manifests.extend(render_trainingjob(obj, _settings(args)))
            continue
        uri = None
        source = obj.spec.model.training_job
        if source in jobs:
            uri = artifact_uri(jobs[source])
        elif source:
            print(f"# {obj.metadata.name}: TrainingJob {source} is not in this file; the operator creates the "
                  "Deployment once the job has Succeeded and its artifact location is known", file=sys.stderr)
        manifests.extend(render_inferenceservice(obj, _settings(args), ServicePlan(storage_uri=uri)))
    sys.stdout.write(yaml.safe_dump_all(manifests, sort_keys=False))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    items = load.load_file(args.filename)
    for item in items:
        print(f"{item.source}: {item.obj.kind}/{item.obj.metadata.name} is valid")
    return 0


def cmd_crds(args: argparse.Namespace) -> int:
    if args.reference:
        Path(args.reference).write_text(crdgen.reference_markdown())
        print(f"wrote {args.reference}")
    if args.write:
        for path in crdgen.write(Path(args.write)):
            print(f"wrote {path}")
    if not (args.write or args.reference):
        sys.stdout.write("---\n".join(crdgen.render_files().values()))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Exec the model server (it needs torch, which the operator package never imports)."""
    argv = [sys.executable, "-m", "aiaas.server", "--model", args.model, "--port", str(args.port),
            "--host", args.host, *(["--name", args.name] if args.name else [])]
    os.execv(sys.executable, argv)
    return 0  # not reached


# Subcommands implemented in their own modules (imported only when used): name -> module with
# ``add_arguments(parser)`` and ``run(args) -> int``.
PLUGGED = {"run": "aiaas.operator.local", "operator": "aiaas.operator.main"}


def build_parser(plugged: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aiaas", description="AI models as a service on Kubernetes.")
    parser.add_argument("--version", action="version", version=f"aiaas {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("render", help="print the Kubernetes objects the operator would create")
    p.add_argument("-f", "--filename", required=True, help="YAML file with TrainingJobs/InferenceServices ('-': stdin)")
    p.add_argument("-n", "--namespace", help="namespace for objects that name none")
    p.add_argument("--image", default=DEFAULT_IMAGE, help="default trainer/server image")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("validate", help="check resources; exit 1 with a message per problem")
    p.add_argument("-f", "--filename", required=True, help="YAML file ('-': stdin)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("crds", help="print the generated CustomResourceDefinitions")
    p.add_argument("--write", metavar="DIR", help="write them to DIR (the repo keeps them in crds/)")
    p.add_argument("--reference", metavar="FILE", help="write the field reference as Markdown to FILE")
    p.set_defaults(func=cmd_crds)

    p = sub.add_parser("serve", help="serve a trained model artifact over the Open Inference Protocol")
    p.add_argument("--model", required=True, help="artifact directory (what `aiaas run` printed)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--name", help="model name in URLs (default: from the artifact)")
    p.set_defaults(func=cmd_serve)

    for name, module in PLUGGED.items():
        if plugged == name:
            mod = importlib.import_module(module)
            p = sub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0])
            mod.add_arguments(p)
            p.set_defaults(func=mod.run)
        else:
            sub.add_parser(name, help=f"(see `aiaas {name} --help`)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    plugged = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(plugged if plugged in PLUGGED else None)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except load.InvalidResource as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except FileNotFoundError as err:
        print(f"error: {err.filename}: no such file", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
