"""smartkv-lm-eval: lm-eval's command line with the smartkv model registered.

    smartkv-lm-eval --model_args pretrained=smollm2,method=smartkv,budget=4 --tasks smartkv_tiny --limit 4

Everything is lm-eval's (`smartkv-lm-eval --help`, `smartkv-lm-eval ls tasks`, --output_path, --log_samples, ...)
except three defaults: --model smartkv, --device auto (lm-eval's default is cuda:0), and smartkv's offline tasks
added to --include_path.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    try:
        from lm_eval._cli import HarnessCLI
        from lm_eval.utils import setup_logging
    except ImportError:
        print("error: smartkv-lm-eval needs lm-eval: pip install 'smartkv[lmeval]'", file=sys.stderr)
        raise SystemExit(2) from None
    import smartkv.lmeval  # noqa: F401  (registers --model smartkv)
    from smartkv.data.lmeval import TASKS_DIR

    sys.argv = ["smartkv-lm-eval", *(sys.argv[1:] if argv is None else argv)]
    setup_logging()
    parser = HarnessCLI()
    args = parser.parse_args()
    if hasattr(args, "include_path"):
        args.include_path = [str(TASKS_DIR), *([args.include_path] if args.include_path else [])]
    if getattr(args, "command", None) == "run":
        args.model = args.model or "smartkv"
        args.device = getattr(args, "device", None) or "auto"
    parser.execute(args)


if __name__ == "__main__":
    main()
