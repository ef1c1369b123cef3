"""The one exception type users see.

Every problem a user can fix (bad data, a wrong parameter, a missing model) is raised as a
``TextclfError`` whose message names the file or parameter and the problem. The entry points print
it as one line and exit non-zero; anything else is a bug and keeps its traceback.
"""


class TextclfError(Exception):
    """A problem with the user's input or environment, reported as one clear line."""


class TrainingInterrupted(BaseException):
    """SIGINT or SIGTERM arrived during a run; the run ends KILLED.

    A BaseException, like KeyboardInterrupt: library code that catches Exception must not swallow or
    re-wrap it (the run would then end FAILED instead of KILLED).
    """

    def __init__(self, signal_name: str):
        super().__init__(f"interrupted by {signal_name}")
        self.signal_name = signal_name
