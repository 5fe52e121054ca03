"""Small assertions shared by the routing test modules."""

from __future__ import annotations

import pytest

from condformer.errors import ConfigError


def one_line_error(fn, cls=ConfigError) -> str:
    """Call ``fn``, expect ``cls``, check the message is one non-empty line, and return it."""
    with pytest.raises(cls) as err:
        fn()
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg
