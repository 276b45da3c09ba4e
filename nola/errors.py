"""The one exception type for mistakes a user can make.

Everything a user controls (recipe keys, adapter files, data files, CLI flags) is checked and reported by raising
`NolaError` with a single line that names the problem and where it is. Entry points print that line and exit with
code 2; any other exception is our bug and keeps its traceback.
"""


class NolaError(Exception):
    """A user-facing error: `str(err)` is one line naming the problem and its place (file, key, record)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
