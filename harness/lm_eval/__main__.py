"""lm-eval's command line with the ``kvcache`` model registered:

    python -m harness.lm_eval run --model kvcache \\
        --model_args pretrained=PATH,method=lacache,cache_size=256 --tasks TASK --device cpu

Every argument is lm-eval's; a bad ``--model_args`` setting is one line naming it (exit status 2)."""
from __future__ import annotations

import sys

from lacache_core.errors import ConfigError


def main(argv=None) -> int:
    try:
        from lm_eval._cli import HarnessCLI
        from lm_eval.utils import setup_logging
    except ImportError:
        print("error: lm-eval is not installed here: pip install 'lm-eval==0.4.13' accelerate "
              "(or use .venv-lmeval from bash scripts/setup.sh --all)", file=sys.stderr)
        return 2
    from . import model  # noqa: F401  (registers kvcache)

    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    cli = HarnessCLI()
    if len(argv) > 1 and argv[0] not in cli._subparsers.choices:
        argv.insert(0, "run")  # a bare flag list means `run`, as lm-eval's own entry point reads it
    try:
        cli.execute(cli._parser.parse_args(argv))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
