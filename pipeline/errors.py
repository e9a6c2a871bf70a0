"""The one exception type for bad user input: printed as a single line, never as a traceback."""


class PipelineError(Exception):
    """A problem the user can fix; the message says what is wrong and what to do."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (at most ``limit`` characters), for one-line errors."""
    return (str(e).strip().splitlines() or [""])[0][:limit]
