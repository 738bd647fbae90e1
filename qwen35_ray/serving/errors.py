"""Errors in the OpenAI error format: {"error": {"message", "type", "param", "code"}}."""

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

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class Overloaded(OpenAIError):
    """503 with Retry-After: a bounded queue is full, or the replica cannot take work now."""

    def __init__(self, message: str, retry_after_s: int = 1, type: str = "server_overloaded"):
        super().__init__(message, 503, type, headers={"Retry-After": str(retry_after_s)})
