"""Errors that name the input and what is wrong with it."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input: names the file (or field) and the problem.

    ``source`` is the file path, ``shard.tar:member`` or ``metadata.jsonl line N``;
    ``problem`` says what is wrong in plain words.
    """

    def __init__(self, source: object, problem: str):
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")
