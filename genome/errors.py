"""The one base class of user errors: bad config, genome file, checkpoint, data path or CLI argument.

Every such error derives from :class:`UserError` (a ValueError), so the CLI maps them all to exit code 2
with a one-line message without knowing each kind.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user; the message (one line) names the file, key or flag and what is accepted."""
