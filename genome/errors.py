"""The one base class of user errors: bad config, genome file, checkpoint, data path or CLI argument.

Every such error derives from :class:`UserError` (a ValueError), so the CLI maps them all to exit code 2
with a one-line message without knowing each kind.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user; the message (one line) names the file, key or flag and what is accepted."""


class MissingExtra(UserError):
    """An optional dependency (a pip extra of blur-evolve) is not installed."""


def require_extra(module: str, extra: str, what: str):
    """Import ``module`` or raise a one-line :class:`MissingExtra` naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{what} needs {module}, which is not installed: "
                           f"pip install 'blur-evolve[{extra}]'") from None
