"""Errors in the OpenAI error format: {"error": {"message", "type", "param", "code"}}."""

import contextlib
import functools

from starlette.responses import JSONResponse

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    503: "server_overloaded",
    500: "internal_error",
}


class OpenAIError(Exception):
    """An error a client sees with its status; raised anywhere, rendered by the ingress."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        type: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message, self.status, self.param = message, status, param
        fallback = "internal_error" if status >= 500 else "invalid_request_error"
        self.type = type or TYPES.get(status, fallback)
        # e.g. Retry-After on a 503
        self.headers = headers

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.status,
            }
        }

    def as_item(self) -> dict:
        """This error as an item of a replica's response stream. Replicas hand errors back as
        data: Serve logs every exception a replica method raises, with its traceback, and an
        overloaded replica answering a burst with 503s must not flood its log."""
        return {"error": self.body()["error"], "headers": self.headers}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def raise_error_item(item: dict) -> None:
    """The caller's side of OpenAIError.as_item: raise the error an item carries."""
    if "error" in item:
        e = item["error"]
        raise OpenAIError(e["message"], e["code"], e["type"], e["param"], item.get("headers"))


def errors_as_items(method):
    """Wraps a replica's async-generator method: an OpenAIError ends the stream as its last
    item (OpenAIError.as_item) instead of being raised through Serve."""

    @functools.wraps(method)
    async def wrapper(*args, **kwargs):
        # closing the wrapper (a client gone) closes the method's stream at once
        async with contextlib.aclosing(method(*args, **kwargs)) as stream:
            try:
                async for item in stream:
                    yield item
            except OpenAIError as e:
                yield e.as_item()

    return wrapper


class Overloaded(OpenAIError):
    """503 with Retry-After: a bounded queue is full, or the replica cannot take work now."""

    def __init__(self, message: str, retry_after_s: int = 1, type: str = "server_overloaded"):
        super().__init__(message, 503, type, headers={"Retry-After": str(retry_after_s)})


class EngineLost(Overloaded):
    """The replica's engine died: a 503 for a client, and for the ingress a replica lost like
    one whose process died, so it resumes the stream elsewhere (streams.guarded)."""

    def __init__(self, message: str):
        super().__init__(message, type="service_unavailable")

    def as_item(self) -> dict:
        return {**super().as_item(), "lost": True}
