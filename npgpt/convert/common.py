"""What every reader in npgpt.convert shares: the error type."""

from npgpt.errors import UserError


class ConversionError(UserError, ValueError):
    """A source checkpoint cannot be converted; the message names the file or tensor and why."""
