"""The one error type of data_prep: a problem with a named input, shown to users as one line.

Owns `PrepError` only; imports nothing from the rest of the package.
"""
from __future__ import annotations


class PrepError(Exception):
    """Bad input or a refused operation; the CLI prints `sift-prep: error: <input>: <problem>`."""

    def __init__(self, subject: str, problem: str) -> None:
        super().__init__(f"{subject}: {problem}")
        self.subject = subject
        self.problem = problem
