"""The one exception type for user mistakes; the CLI prints it as a single line."""


class CopdError(Exception):
    """A problem with the user's input (config, data, paths), reported without a traceback."""
