"""The one exception type users see: a message that names the problem and the fix."""


class GraphoptError(Exception):
    """Bad input or an unsupported model. The CLI prints `error: <message>` and exits with code 2."""
