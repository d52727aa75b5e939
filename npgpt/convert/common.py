"""What every reader in npgpt.convert shares: the error type."""


class ConversionError(ValueError):
    """A source checkpoint cannot be converted; the message names the file or tensor and why."""
