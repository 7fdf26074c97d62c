"""The one exception type library code raises; only the CLI turns it into an exit code."""


class CxrError(Exception):
    """A user-facing failure: bad input, bad params, missing artifact."""
