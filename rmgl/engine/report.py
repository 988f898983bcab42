"""Former name of :mod:`rmgl.engine.failure_report` (deprecated): ``rmgl.engine.report`` was
one of three things called "report". Its names still resolve here, with a
``DeprecationWarning``; import them from :mod:`rmgl.engine.failure_report`."""

from __future__ import annotations

import warnings

from rmgl.engine import failure_report


def __getattr__(name: str):
    value = getattr(failure_report, name)  # AttributeError for a name it never had
    warnings.warn(
        f"rmgl.engine.report is deprecated: import {name} from rmgl.engine.failure_report",
        DeprecationWarning,
        stacklevel=2,
    )
    return value
