"""The exception types that the example CLIs turn into ``error: ...`` (exit status 2)."""


class ExampleError(Exception):
  """Bad user input (missing path, empty corpus, unknown name, ...).

  The message is a single line meant for the user; the command-line tools print it as
  ``error: <message>`` to stderr and exit with status 2, without a traceback.
  """

  def __init__(self, message: str):
    # Keep the message on one line whatever the caller passed in.
    super().__init__(" ".join(str(message).split()))


class DivergenceError(ExampleError):
  """Training stopped because its loss or gradients stopped being finite.

  ``examples.compare`` counts a learning-rate trial that raises it as diverged (infinite
  tuning loss) instead of stopping the whole comparison.
  """
