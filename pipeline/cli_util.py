"""What every console script shares: an argument parser whose usage errors are one line.

argparse prints its usage block and then the error; a script's errors here are one line on
stderr, `<prog>: error: <message>`, exit code 2 (the usage is one `--help` away).
"""
from __future__ import annotations

import argparse
import re

# Characters that would break "one line" (a path may hold a newline): shown escaped, as sift-prep does.
_LINE_BREAKING = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")


def one_line(text: object) -> str:
    """`text` with line breaks and other control characters escaped ("\\n"): one line."""
    return _LINE_BREAKING.sub(lambda m: repr(m.group())[1:-1], str(text))


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
