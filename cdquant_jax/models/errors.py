"""The error of checkpoint loading: bad input, not a bug (the CLI prints it as one line, exit 2)."""


class ModelLoadError(ValueError):
  """A checkpoint that cannot be loaded as it is.

  An unreadable or corrupt file, an unsupported architecture, config field or value, or tensors
  that do not match the architecture. The message names the file and the offending field and
  value. A missing file raises FileNotFoundError instead.
  """
