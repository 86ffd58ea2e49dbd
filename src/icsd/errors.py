"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input, a missing file, an impossible setting: something the user must change."""

    exit_code = 2
