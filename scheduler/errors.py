"""Domain errors raised by admission and the worker; server/errors.py maps them to HTTP."""


class Overloaded(Exception):
    """The queue is full; the client should retry later."""


class NotReady(Exception):
    """The model is not loaded yet, or the server is draining."""


class BackendError(Exception):
    """Running a batch failed; only that batch's requests see this."""


class DeadlineExceeded(Exception):
    """A request waited longer than its timeout and was never computed."""
