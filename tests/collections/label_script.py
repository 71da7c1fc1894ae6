"""`blip2 label` as a separate process for the kill -9 test: the CLI's model and generation options plus
label_command's, then label_command.run. BLIP2_TEST_BATCH_DELAY (seconds) slows each batch down so the test can
kill the run in the middle."""

from __future__ import annotations

import argparse
import os
import sys
import time

from blip2.cli import _generation_options, _model_options
from blip2.collections import label_command


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blip2 label", parents=[_model_options(), _generation_options()])
    label_command.add_arguments(p)
    return p


def main(argv: list[str]) -> int:
    import blip2
    from blip2.inference.pipeline import Blip2

    args = parser().parse_args(argv)
    delay = float(os.environ.get("BLIP2_TEST_BATCH_DELAY", "0"))
    if delay:
        real = Blip2._generate

        def slow(self, *a, **k):
            time.sleep(delay)
            return real(self, *a, **k)

        Blip2._generate = slow
    return label_command.run(args, lambda: blip2.load(args.model, device="cpu", batch_size=args.batch_size))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
