"""The error contract of every `cdquant` command.

Bad input ends a command with ONE line on stderr, `error: <the thing>: <what is wrong, with the
value>`, and exit code 2 (`EXIT_USER_ERROR`); `cdquant -v ...` prints the traceback instead.
Bad input is an exception of a type in `USER_ERRORS`: a missing or unreadable file (OSError), a
corrupt or unsupported checkpoint (ModelLoadError), an unknown config field or a bad value in a
YAML file or `--set` (ConfigError, yaml.YAMLError), NaN/Inf activations (HessianError), an
impossible command-line value (UsageError), ... Any other exception (AssertionError, TypeError,
a plain ValueError inside the library) is a bug and keeps its traceback and exit code 1.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import traceback
from typing import Callable, Iterator

import yaml
from safetensors import SafetensorError

from cdquant_jax import config as config_lib
from cdquant_jax.cli import layer
from cdquant_jax.data.protocol import DatasetUnavailableError
from cdquant_jax.export.common import ExportError
from cdquant_jax.models.errors import ModelLoadError
from cdquant_jax.pipeline.checkpoint import ResumeError
from cdquant_jax.quant.serialize import QuantFileError
from cdquant_jax.solvers.hessian import HessianError

EXIT_USER_ERROR = 2


class UsageError(ValueError):
  """A command-line value of the right type that cannot work (e.g. --max-new-tokens 0)."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    UsageError,
    config_lib.ConfigError,  # unknown config field, bad value, impossible combination
    yaml.YAMLError,  # a config file that is not YAML
    ModelLoadError,  # corrupt or unsupported checkpoint, tensors that do not match
    QuantFileError,  # a quantized-weights file that cannot be read back exactly
    ResumeError,  # --resume with a checkpoint of another model, data or config
    HessianError,  # NaN/Inf activations, a Hessian that is not positive definite
    DatasetUnavailableError,  # an optional dataset (or the `datasets` package) is missing
    layer.BadInput,  # `cdquant layer`: a bad (W, H) npz
    ExportError,  # `cdquant export`: a module the format cannot hold (names the formats that can)
    OSError,  # a missing, unreadable or unwritable file
)


def one_line(error: BaseException) -> str:
  """The message of `error` on one line; OSErrors as "<file>: <reason>"."""
  if isinstance(error, OSError) and error.filename is not None and error.strerror:
    text = f"{error.filename}: {error.strerror}"
  else:
    text = str(error) or type(error).__name__
  return " ".join(text.split())


def report(error: BaseException, *, verbose: bool = False) -> int:
  """Prints `error` as one stderr line (its traceback when verbose); returns EXIT_USER_ERROR."""
  if verbose:
    traceback.print_exception(error)
  else:
    print(f"error: {one_line(error)}", file=sys.stderr)
  return EXIT_USER_ERROR


def run_command(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
  """command(args), with a user error reported by `report` (traceback under -v): exit code 2."""
  try:
    return command(args)
  except USER_ERRORS as e:
    return report(e, verbose=getattr(args, "verbose", False))


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose own errors (unknown flag, bad type or choice, missing argument) raise
  UsageError instead of printing the usage and exiting, so they follow the contract too."""

  def error(self, message: str):
    raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


@contextlib.contextmanager
def about(where: str | None) -> Iterator[None]:
  """Prefixes the config errors raised inside with `where` (the YAML file or flag they are in)."""
  try:
    yield
  except config_lib.ConfigError as e:
    raise config_lib.ConfigError(f"{where}: {e}" if where else str(e)) from e
  except yaml.YAMLError as e:
    raise config_lib.ConfigError(f"{where}: not valid YAML ({one_line(e)})") from e


@contextlib.contextmanager
def loading(path: str) -> Iterator[None]:
  """Errors of a loader reading the user's `path` as ModelLoadError naming it.

  For loaders outside `models/` (the quantized model directory) that raise a plain ValueError
  with a clear message (bad JSON, wrong format, missing parameters) or safetensors' own error.
  """
  try:
    yield
  except ModelLoadError:
    raise
  except (ValueError, SafetensorError) as e:  # also ConfigError, QuantFileError: name the path
    message = one_line(e)
    raise ModelLoadError(message if path in message else f"{path}: {message}") from e


def require(condition: bool, message: str) -> None:
  """Raises UsageError(message) unless `condition` (checks of command-line values)."""
  if not condition:
    raise UsageError(message)
