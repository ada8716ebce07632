"""What every console script shares: an argument parser whose usage errors are one line.

argparse prints its usage block and then the error; a script's errors here are one line on
stderr, `<prog>: error: <message>`, exit code 2 (the usage is one `--help` away).
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys

# Characters that would break "one line" (a path may hold a newline): shown escaped, as sift-prep does.
_LINE_BREAKING = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")


def first_few(names: list[str], shown: int = 3) -> str:
    """The first `shown` of `names` and how many more: what an error line lists of a directory."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


def one_line(text: object) -> str:
    """`text` with line breaks and other control characters escaped ("\\n"): one line."""
    return _LINE_BREAKING.sub(lambda m: repr(m.group())[1:-1], str(text))


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def exit_distributed_process(code: int) -> None:
    """End a process that joined a torch.distributed group, skipping the interpreter's teardown.

    Call it after the run closed its files and destroyed the process group. torch's and gloo's
    C++ threads can outlive destroy_process_group, and the teardown then sometimes aborts
    ("terminate called without an active exception", SIGABRT): a finished run's exit 0 became -6
    (once in ~100 two-rank CI runs, after the run printed "done"). Under mpirun a finished rank
    must still finalize MPI, or mpirun calls the job failed; after an error it must not wait
    for peers that may be gone."""
    logging.shutdown()  # what atexit would have flushed
    if code == 0:  # every rank finished: tell mpirun so (mpi4py's atexit hook would have)
        mpi = sys.modules.get("mpi4py.MPI")
        if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
            mpi.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
