"""What Python 3.11 added that the agent uses, for Pythons 3.9 and 3.10 (RHEL 9, Ubuntu 22.04).

`tomllib` is `tomli` below 3.11 (same API; a dependency there only). `StrEnum` is a `str` and
an `Enum` whose `str()` and `format()` give the value, as 3.11's does.
"""

from __future__ import annotations

import sys
from enum import Enum

if sys.version_info >= (3, 11):
    from enum import StrEnum

    import tomllib
else:  # pragma: no cover - run by tests/test_pyversions.py on 3.9
    import tomli as tomllib

    class StrEnum(str, Enum):
        def __str__(self) -> str:
            return str.__str__(self)

        def __format__(self, format_spec: str) -> str:
            return str.__format__(self, format_spec)


__all__ = ["StrEnum", "tomllib"]
