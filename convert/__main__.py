"""python -m convert --var VAR.pth --vae VAE.pth --out DIR: the command-line shell.

Parses the flags and calls `convert.convert_checkpoints`; every failure is one line on
stderr (`convert: error: ...`) and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

EXIT_ERROR = 1  # argparse's own usage errors exit with 2
EXIT_INTERRUPTED = 130


def _patch_nums(text: str) -> tuple[int, ...]:
    try:
        pns = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not pns or any(p <= 0 for p in pns):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return pns


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m convert",
        description="Convert upstream VAR / VQVAE checkpoints (.pth) into a varjax checkpoint directory.",
    )
    parser.add_argument("--var", metavar="VAR.pth", help="VAR transformer checkpoint (e.g. var_d16.pth)")
    parser.add_argument("--vae", metavar="VAE.pth", help="VQVAE checkpoint (e.g. vae_ch160v4096z32.pth)")
    parser.add_argument("--out", metavar="DIR", required=True, help="directory to create")
    parser.add_argument("--force", action="store_true", help="replace DIR if it exists")
    parser.add_argument("--patch-nums", type=_patch_nums, metavar="1,2,...",
                        help="scale pyramid, if not a known one (256 px: 1,2,3,4,5,6,8,10,13,16)")
    args = parser.parse_args(argv)
    if args.var is None and args.vae is None:
        parser.error("give --var and/or --vae")
    return args


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Conversion needs no accelerator; keep jax from claiming (and logging about) one.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    signal.signal(signal.SIGTERM, _interrupt)  # a killed job cleans up like Ctrl-C
    from convert import convert_checkpoints
    from varjax.errors import VarjaxError

    try:
        convert_checkpoints(args.var, args.vae, args.out, args.force, patch_nums=args.patch_nums)
    except VarjaxError as err:  # ConvertError, or the checkpoint writer's CheckpointError
        print(f"convert: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("convert: interrupted; nothing written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 -- a bug: still one line, with what is needed to report it
        first = (str(err).strip().splitlines() or [""])[0][:300]
        print(f"convert: internal error: {type(err).__name__}: {first}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
