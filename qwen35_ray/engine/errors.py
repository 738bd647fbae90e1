"""How a request can fail, by whose fault. Serving maps them to HTTP statuses.

- RequestError (400): the request itself cannot be run as given; the message says what to change.
- RequestFailed (500): our fault while running one request; the engine and every other request
  go on. The message names the request id; the traceback is in the log only.
- EngineDead (503): the model itself failed; the engine takes nothing more and the replica
  reports unhealthy.
"""

import logging

log = logging.getLogger(__name__)


class RequestError(ValueError):
    pass


class RequestFailed(RuntimeError):
    pass


class EngineDead(RuntimeError):
    pass


def request_failure(request_id: str, e: Exception, when: str) -> RequestError | RequestFailed:
    """The error one request's stream ends with when `e` stopped it `when` ("being added"...):
    RequestError when its input is at fault, else RequestFailed. The traceback is logged here,
    with the request id, and never sent to the client."""
    if isinstance(e, (RequestError, RequestFailed)):
        return e
    log.error("request %r failed while %s", request_id, when, exc_info=e)
    if isinstance(e, (ValueError, OverflowError)):
        said = str(e) if repr(request_id) in str(e) else f"request {request_id!r}: {e}"
        return RequestError(said)
    return RequestFailed(
        f"request {request_id!r} failed while {when} ({type(e).__name__}); "
        "the server log has the details"
    )
