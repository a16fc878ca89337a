"""Errors raised by the data set loaders, and the record of items skipped with `skip_invalid=True`."""

import logging
from collections import Counter


class DatasetFormatError(ValueError):
    """A data set file does not follow its format.

    The message names the file, the place in it (a line number or a field), what was expected and what was found.
    `reason` is the short form used to count skipped items.
    """

    def __init__(self, file: str, where: str, expected: str, got: str):
        self.file = str(file)
        self.where = where
        self.reason = f"expected {expected}"
        super().__init__(f"{file}, {where}: expected {expected}, got {got}")


class MissingDataFileError(FileNotFoundError):
    """An image or mask file that a data set file refers to does not exist."""

    def __init__(self, path: str, kind: str, referenced_by: str):
        self.path = str(path)
        self.reason = f"missing {kind} file"
        super().__init__(f"{referenced_by}: {kind} file {path} does not exist")


class InvalidItems:
    """Raises each invalid item, or with `skip_invalid=True` collects it so the loader can drop it and log a summary.

    Args:
        skip_invalid (`bool`):
            Whether invalid items are skipped (and logged) instead of raised.
    """

    def __init__(self, skip_invalid: bool):
        self.skip_invalid = skip_invalid
        self.skipped: list[DatasetFormatError | MissingDataFileError] = []

    def handle(self, error: DatasetFormatError | MissingDataFileError) -> None:
        if not self.skip_invalid:
            raise error
        self.skipped.append(error)

    def log_summary(self, logger: logging.Logger, source: str) -> None:
        """Logs one warning with the number of skipped items, their reasons and the first few messages."""
        if not self.skipped:
            return
        reasons = Counter(error.reason for error in self.skipped)
        reason_text = "; ".join(f"{count} x {reason}" for reason, count in reasons.most_common())
        examples = "\n  ".join(str(error) for error in self.skipped[:5])
        logger.warning(
            f"Skipped {len(self.skipped)} invalid items while loading {source}: {reason_text}. First:\n  {examples}"
        )
