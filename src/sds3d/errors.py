"""The one exception type for mistakes a user can fix; the CLI prints it as one line, exit code 2."""


class UserError(Exception):
    """Bad input: an unknown preset, an empty prompt, a missing model path, …"""
