"""Reading the JSON files of a checkpoint (config.json, generation_config.json, processor_config.json,
the shard index) with one error rule: a file that is not UTF-8 JSON raises ValueError naming the file."""
from __future__ import annotations

import json
import os
from typing import Any


def read_json(file: str | os.PathLike) -> Any:
    """The parsed content of ``file``.

    Raises FileNotFoundError if it does not exist, and ValueError "<file>: not valid JSON (<reason>)"
    for bad JSON, bad UTF-8 or nesting too deep to parse."""
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{os.fspath(file)}: not valid JSON ({exc})") from exc
