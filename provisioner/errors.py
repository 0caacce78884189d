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


class ConfigErrors(ConfigError):
    """Several things wrong in one file, all found in one reading: one line each."""

    def __init__(self, errors: list[ConfigError]):
        self.errors = list(errors)
        first = self.errors[0]
        super().__init__(first.path, first.field, first.message)
        self.args = ("\n".join(str(e) for e in self.errors),)

    def __str__(self) -> str:
        return self.args[0]


class UsageError(ProvisionerError):
    """The command line is wrong (bad node set, unknown node, bad argument)."""


class OperationError(ProvisionerError):
    """An operation was attempted and failed (daemon down, refused, timed out)."""
