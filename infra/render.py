"""Copy infra/serve.yaml, less its comments, into infra/kuberay/rayservice.yaml as the RayService's serveConfigV2.

    python infra/render.py            # rewrite the serveConfigV2 block (nothing else in the file changes)
    python infra/render.py --check    # exit 1, saying so, when the RayService is out of date

infra/serve.yaml is itself `s2t serve ... --print-config` output (`make infra/serve.yaml`), so the chain is
s2t serve's options -> infra/serve.yaml -> the RayService; tests/test_serve.py and tests/test_infra.py check both links.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

INFRA = Path(__file__).resolve().parent
SERVE_YAML = INFRA / "serve.yaml"
RAYSERVICE_YAML = INFRA / "kuberay" / "rayservice.yaml"
KEY = "  serveConfigV2: |"
INDENT = "    "


def serve_config(serve_yaml: str) -> str:
    """The Serve config without its comment lines (yaml.safe_dump output: no other line starts with '#')."""
    lines = [line for line in serve_yaml.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return "\n".join(lines) + "\n"


def render(rayservice_yaml: str, config: str) -> str:
    """rayservice_yaml with its serveConfigV2 literal block replaced by `config`."""
    lines = rayservice_yaml.splitlines(keepends=True)
    try:
        start = next(i for i, line in enumerate(lines) if line.rstrip("\n") == KEY) + 1
    except StopIteration:
        raise SystemExit(f"{RAYSERVICE_YAML}: no line {KEY.strip()!r} to fill in") from None
    end = start
    while end < len(lines) and (lines[end].startswith(INDENT) or not lines[end].strip()):
        end += 1
    block = [INDENT + line + "\n" for line in config.splitlines()]
    return "".join(lines[:start] + block + lines[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that the RayService is up to date")
    args = parser.parse_args(argv)
    current = RAYSERVICE_YAML.read_text()
    wanted = render(current, serve_config(SERVE_YAML.read_text()))
    if args.check:
        if current != wanted:
            print(f"{RAYSERVICE_YAML} is out of date with {SERVE_YAML}: run python infra/render.py", file=sys.stderr)
            return 1
        return 0
    if current != wanted:
        RAYSERVICE_YAML.write_text(wanted)
        print(f"wrote {RAYSERVICE_YAML}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
