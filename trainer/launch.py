"""`python -m trainer.launch <torchrun options> -m trainer.train <overrides>`: torchrun that exits with the
trainer's exit code (2 for bad input, 4 when stopped by a signal, ...) after the trainer's own one line, instead
of torchrun's failure report (~40 lines and code 1). The launch scripts use it; its options are torchrun's."""

from __future__ import annotations

import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(sys.argv[1:] if argv is None else argv)
    # the agent logs every worker's exit and the signals it sends; the trainer has already said what happened
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as exc:
        codes = [failure.exitcode for _, failure in sorted(exc.failures.items())]
        return next((c for c in codes if c > 0), 1)  # killed by a signal (negative): a generic failure
    return 0


if __name__ == "__main__":
    sys.exit(main())
