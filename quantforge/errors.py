"""Typed errors. Library code raises these; only the CLI turns them into messages and exit codes.

Each message says what was expected, what arrived, and how to fix it, in one line.
"""

from __future__ import annotations


class QuantforgeError(Exception):
    """Base of every error quantforge raises on purpose. ``exit_code`` is what the CLI returns."""

    exit_code = 2

    def __init__(self, message: str, *, path: object | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class InputError(QuantforgeError):
    """Bad user input: arguments, files, values."""


class CorruptCheckpoint(InputError):
    """A checkpoint file is truncated, unparsable, or holds non-finite weights."""


class MissingFile(InputError):
    """A file the stage needs (config, tokenizer, shard) is absent."""


class UnsupportedArch(InputError):
    """The model's architecture has no mapping in quantforge."""


class UnsupportedFormat(InputError):
    """A quant type or format name is unknown, or a tensor shape does not fit it."""


class RegistryError(QuantforgeError):
    """A format registration would duplicate a name or id (a programming error: exit 3, like every bug)."""

    exit_code = 3


class OutputExists(InputError):
    """The output already exists and ``--force`` was not given."""


class OutputError(QuantforgeError):
    """Writing the output failed (disk full, permissions); nothing partial is left behind."""


class PlanError(InputError):
    """A plan file is malformed, names unknown tensors or formats, or breaks a budget."""


class RegressionError(QuantforgeError):
    """An evaluation regressed past the gate's thresholds."""

    exit_code = 1


class PublishError(InputError):
    """Publishing was refused or failed; nothing was committed."""


class InternalError(QuantforgeError):
    """An invariant of quantforge itself broke (e.g. an encoder wrote the wrong number of bytes): a bug to report,
    never bad input. The CLI exits with :data:`BUG_EXIT_CODE` and shows the traceback under ``--verbose``."""

    exit_code = 3


BUG_EXIT_CODE = InternalError.exit_code
"""Exit code of a bug: neither 1 (a failed regression gate) nor 2 (bad input)."""


class MissingExtra(InputError):
    """An optional dependency group (a pip extra) that this command needs is not installed."""

    def __init__(self, what: str, extra: str, package: str) -> None:
        self.extra = extra
        super().__init__(f"{what} needs the '{package}' package, which the light install leaves out; "
                         f"install it with: pip install 'quantforge[{extra}]'")


class UnsupportedAdapter(InputError):
    """An adapter type or construct quantforge cannot merge or export (DoRA, IA3, LoRA bias, ...)."""


class AdapterMismatch(InputError):
    """An adapter's module names or shapes do not match the base checkpoint."""


class UntranslatableTemplate(InputError):
    """A chat template uses a construct that has no Go-template (Ollama) equivalent."""


class ImatrixRequired(InputError):
    """The quant type cannot be made without an importance matrix (llama.cpp refuses it too)."""
