"""What every console script shares: an argument parser whose usage errors are one line.

argparse prints its usage block and then the error; a script's errors here are one line on
stderr, `<prog>: error: <message>`, exit code 2 (the usage is one `--help` away).
"""
from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
