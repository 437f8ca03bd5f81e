"""polysample.Error: what every failed call raises."""


class Error(Exception):
    """A call polysample refused or that failed.

    status: the C status name without its prefix, e.g. "INVALID_PARAMETER"
        for PSM_ERR_INVALID_PARAMETER (see include/polysample.h).
    message: the library's message (psm_last_error()) or the package's own.
    code: the numeric psm_status.
    """

    def __init__(self, status, message, code=None):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.code = code if code is not None else STATUS_CODES.get(status)


class ChoiceError(Error, ValueError):
    """A name outside its set (filter_order): Error("INVALID_ARGUMENT"), and
    a ValueError as well, which is what Python code raises for a bad choice."""

    def __init__(self, message):
        super().__init__("INVALID_ARGUMENT", message)


STATUS_CODES = {
    "INVALID_ARGUMENT": 1,
    "INVALID_PARAMETER": 2,
    "UNSUPPORTED": 3,
    "BACKEND_NOT_COMPILED": 4,
    "NO_DEVICE": 5,
    "DRIVER": 6,
    "OUT_OF_MEMORY": 7,
    "BAD_ROW": 8,
    "WRONG_BACKEND": 9,
    "ENVIRONMENT": 10,
    "INTERNAL": 11,
}
