"""Exception types shared by every module; the CLI maps them to exit codes (2 config, 1 op)."""


class ProvisionerError(Exception):
    """Base class. str(err) is a one-line message that says what to do next."""


class ConfigError(ProvisionerError):
    """The site config is wrong. Always names the file and the field."""

    def __init__(self, path, field: str, message: str):
        self.path = str(path)
        self.field = field
        self.message = message
        where = f"{self.path}: {field}" if field else self.path
        super().__init__(f"{where}: {message}")


class UsageError(ProvisionerError):
    """The command line is wrong (bad node set, unknown node, bad argument)."""


class OperationError(ProvisionerError):
    """An operation was attempted and failed (daemon down, refused, timed out)."""
