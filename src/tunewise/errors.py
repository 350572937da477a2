"""The project's errors: each one is the user's to fix, and its message says what, where and how.

The CLI catches these (and only these) to print one line and exit 2; anything else is a bug and
shows its traceback. No imports beyond the standard library, so every module can raise them.
"""


class ConfigError(Exception):
    """A config that cannot run; the message lists every problem with its location and fix."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in the config:\n{lines}")


class DataError(Exception):
    """Data that cannot be trained on; the message names the file and line (or row), the problem, the fix."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason  # the bad-row reason when one row is at fault (e.g. "template_error")


class DoctorError(Exception):
    """Logs are missing or unreadable; the message names the file (and line) and what was expected."""


class ModelError(Exception):
    """The model cannot be found or loaded; the message says why and what to do."""


class CheckpointError(Exception):
    """A checkpoint could not be written; the message names it, the cause, the last good one and the fix."""
