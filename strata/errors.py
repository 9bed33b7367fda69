"""User-facing errors: one exception type whose message is a single actionable line."""


class StrataError(Exception):
    """An error the user can act on: names the file/field/tensor, what was expected and what was found.

    The CLI prints str(err) on one line and exits with code 2 (traceback only with --debug).
    """


class ConfigError(StrataError):
    """A config.json (or other config file) field is missing or invalid."""


class WeightsError(StrataError):
    """A weights file is missing, truncated, or a tensor is missing or mis-shaped."""


class UnsupportedError(StrataError):
    """A valid input that Strata does not support (unknown architecture, format...)."""


class InvalidRequestError(StrataError):
    """A request parameter is out of range or inconsistent (names the parameter)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class DistributedError(StrataError):
    """A rank of a tensor-parallel model died or a collective failed (names the rank)."""
