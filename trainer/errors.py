"""The engine's exceptions. Each message is meant for the user: it names the setting or file and the fix."""


class ConfigError(ValueError):
    """A setting is wrong. The message names the setting and how to fix it."""


class TrainingError(Exception):
    """A failure with a message meant for the user (names the setting or file and the fix)."""


class TrainingInterrupted(Exception):
    """Raised by a host when the user pressed Stop. The loop saves a resumable state before re-raising."""
