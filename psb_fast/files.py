"""Reading untrusted JSON and TOML files: every way a file can be bad becomes one ValueError line.

    values = read_json(path, "tuned-settings file")     # -> the decoded JSON value
    values = read_toml(path, "config file")             # -> dict

This is the one place that opens a user's JSON / TOML file (configs, tuned settings, defaults,
shard plans). `role` says what the file is for, and every message names the file and its role:

    missing file                          FileNotFoundError   "<role> 'PATH' does not exist"
    a folder, not a file                  ValueError          "<role> 'PATH' is a folder, expected a file"
    not UTF-8 (a binary file)             ValueError          "... is not UTF-8 text (byte 0xff at offset 0)"
    not valid JSON / TOML                 ValueError          "... is not valid JSON: <parser message>"
    nested too deeply                     ValueError          "... nests deeper than Python can parse"
    a JSON object with a repeated key     ValueError          "... repeats the key 'K' in one object"
    other read errors (permissions, ...)  OSError naming the file (the CLI exits with status 4)

Repeated keys are refused because JSON parsers keep the last one silently, so a file that says
two things would mean whichever came last. NaN and Infinity literals are accepted here (Python's
json writes them); callers check the values they read. The caller validates the structure: these
functions only guarantee that a value was decoded, or one line saying why not.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_json(path: str | os.PathLike, role: str) -> object:
    """The JSON value in `path` (dict, list, str, int, float, bool or None).

    Args:
        path: the file to read.
        role: what the file is, for messages, e.g. "tuned-settings file", "shard plan".

    Raises:
        FileNotFoundError if `path` does not exist; ValueError (one line naming the file and its role)
        if it is a folder, not UTF-8, not valid JSON, nested too deeply or repeats a key in an object;
        OSError naming the file for other read errors.
    """
    path = Path(path)
    text = _read_text(path, role)
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except _RepeatedKey as err:
        raise ValueError(f"{role} {str(path)!r} repeats the key {err.args[0]!r} in one object") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{role} {str(path)!r} is not valid JSON: {err}") from None
    except RecursionError:
        raise ValueError(f"{role} {str(path)!r} nests deeper than Python can parse") from None


def read_toml(path: str | os.PathLike, role: str) -> dict:
    """The TOML table in `path`, as a dict (errors as in read_json; TOML itself refuses repeated keys).

    Needs Python >= 3.11 (tomllib); on older Pythons it raises ValueError saying so.
    """
    path = Path(path)
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise ValueError(f"reading the {role} {str(path)!r} needs Python >= 3.11 (tomllib); "
                         f"use a .json file") from None
    text = _read_text(path, role)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{role} {str(path)!r} is not valid TOML: {err}") from None
    except RecursionError:
        raise ValueError(f"{role} {str(path)!r} nests deeper than Python can parse") from None


class _RepeatedKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _RepeatedKey(key)
        out[key] = value
    return out


def _read_text(path: Path, role: str) -> str:
    if not path.exists():
        raise FileNotFoundError(f"{role} {str(path)!r} does not exist")
    if path.is_dir():
        raise ValueError(f"{role} {str(path)!r} is a folder, expected a file")
    try:
        data = path.read_bytes()
    except OSError as err:
        if err.filename is None:
            err.filename = str(path)
        raise
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{role} {str(path)!r} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
                         f"{err.start}); expected a text file") from None
