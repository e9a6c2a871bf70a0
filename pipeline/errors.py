"""The one exception type for bad user input: printed as a single line, never as a traceback."""


class PipelineError(Exception):
    """A problem the user can fix; the message says what is wrong and what to do."""
