"""The one exception the service raises for a request it cannot answer: an HTTP status and
one line that says what was wrong and how to fix it (the client sees exactly this)."""

from __future__ import annotations

__all__ = ["RequestError"]


class RequestError(Exception):
    """A request refused with ``status`` (4xx, or 503 when the service cannot answer now).

    Examples::

        raise RequestError(413, "image 0 is 20000 x 20000 pixels; the limit is 12000000")
    """

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
