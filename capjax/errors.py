"""Errors a user can fix themselves; launch.py shows them as one sentence, no traceback."""


class UserError(ValueError):
  """A path, file or config value is wrong; the message says which and what to do."""
