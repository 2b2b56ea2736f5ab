"""`s2t serve --model URI`: the OpenAI-compatible audio API on Ray Serve (a local Ray, or the one RAY_ADDRESS names).

`s2t serve --print-config` writes the Serve config YAML for `serve deploy` (and a RayService's serveConfigV2) from the
same options, so infra/serve.yaml is this command's output, never a second copy to keep in step by hand.
"""

import argparse
import sys
import time

import yaml

from pipeline.serve import ServeConfig, build_app

APP_NAME = "s2t"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    ServeConfig.add_arguments(parser)
    parser.add_argument("--print-config", action="store_true", help="print the Serve config YAML and exit")


def serve_config(config: ServeConfig) -> dict:
    """The `serve deploy` config: one application built by pipeline.serve:build_app from these options."""
    args = config.model_dump(exclude={"host", "port"}, exclude_defaults=False)
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0" if config.host == "127.0.0.1" else config.host, "port": config.port},
        "applications": [
            {"name": APP_NAME, "route_prefix": "/", "import_path": "pipeline.serve:build_app", "args": args}
        ],
    }


def main(args: argparse.Namespace) -> None:
    config = ServeConfig.from_args(args)
    if args.print_config:
        yaml.safe_dump(serve_config(config), sys.stdout, sort_keys=False)
        return
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config.model_dump()), name=APP_NAME, route_prefix="/")
    print(f"serving {config.model} at http://{config.host}:{config.port}/v1 (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
