"""What Python 3.11 added that the agent uses, for Pythons 3.9 and 3.10 (RHEL 9, Ubuntu 22.04).

`tomllib` is `tomli` below 3.11 (same API; a dependency there only). `StrEnum` is a `str` and
an `Enum` whose `str()` and `format()` give the value, as 3.11's does. `zip_strict(a, b)` is
`zip(a, b, strict=True)` (3.10+). `TIMEOUT_ERRORS` catches a socket timeout: before 3.10
`socket.timeout` is an OSError but not a TimeoutError.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from enum import Enum
from typing import TypeVar

T = TypeVar("T")
U = TypeVar("U")

TIMEOUT_ERRORS: tuple[type[OSError], ...] = (TimeoutError,)  # socket.timeout is TimeoutError

if sys.version_info >= (3, 11):
    from enum import StrEnum

    import tomllib
else:  # pragma: no cover - run by tests/test_pyversions.py on 3.9
    import socket

    import tomli as tomllib

    TIMEOUT_ERRORS = (TimeoutError, socket.timeout)

    class StrEnum(str, Enum):
        def __str__(self) -> str:
            return str.__str__(self)

        def __format__(self, format_spec: str) -> str:
            return str.__format__(self, format_spec)


def zip_strict(a: Iterable[T], b: Iterable[U]) -> Iterator[tuple[T, U]]:
    """Pairs of `a` and `b`; ValueError when their lengths differ."""
    left, right = list(a), list(b)
    if len(left) != len(right):
        raise ValueError(f"zip_strict: {len(left)} and {len(right)} items")
    return zip(left, right)


__all__ = ["TIMEOUT_ERRORS", "StrEnum", "tomllib", "zip_strict"]
