"""The library's one exception type: every error it raises on purpose (bad input, an unusable or missing file, a
training stop) extends `InstructImagenError`, so a caller reports any of them with one `except`; the message names
what is wrong."""


class InstructImagenError(Exception):
    """Something the user can act on; the message starts with the field, file or setting at fault."""


class MissingFileError(InstructImagenError, FileNotFoundError):
    """A file that was asked for is not there (a weight file, a config); the message names it."""
