"""`python -m kubetune_trainer --config FILE`: one training worker (run it under torchrun for several).

Exit codes and the failure reason follow errors.py: 0 done, 78 permanent error, 143 stopped by SIGTERM
(after a checkpoint), 1 any other failure. On success rank 0 reports the final figures (errors.final_message).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import load_config
from .errors import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_TERMINATED,
    PermanentError,
    Terminated,
    final_message,
    report_exit,
    report_final,
)

log = logging.getLogger("kubetune_trainer")

DEFAULT_CONFIG = "/etc/kubetune/config.json"


def setup_logging() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # one line per log interval, no bars
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune_trainer", description=__doc__)
    parser.add_argument("--config", default=os.environ.get("KUBETUNE_CONFIG", DEFAULT_CONFIG))
    args = parser.parse_args(argv)
    setup_logging()
    # Imported here so that a bad config is reported before torch is even loaded.
    try:
        cfg = load_config(args.config)
        from .evalsets import message_figures
        from .runtime import init_runtime, shutdown_runtime
        from .train import run

        rt = init_runtime()
        final = run(cfg, rt)
        if rt.is_main:
            report_final(final_message(message_figures(final), cfg.output.dir))
        shutdown_runtime(rt)
    except PermanentError as e:
        log.error("permanent error, not retrying: %s", e)
        report_exit(EXIT_CONFIG, str(e))
        return EXIT_CONFIG
    except Terminated as e:
        log.warning("%s", e)
        report_exit(EXIT_TERMINATED, str(e))
        return EXIT_TERMINATED
    except Exception as e:
        log.exception("training failed")
        report_exit(EXIT_FAILURE, f"{type(e).__name__}: {e}")
        return EXIT_FAILURE
    log.info("training finished")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
