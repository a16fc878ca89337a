"""Loading pickles that hold only builtin containers and scalars, such as the REFER `refs(*).p` files.

Unpickling can call any importable function (`os.system` included), and these files come from the internet. An
unpickler whose `find_class` refuses every global can still build lists, dicts, tuples, strings, numbers, booleans
and `None` (at any protocol), which is all that REFER pickles contain.
"""

import os
import pickle
from typing import Any


class _BuiltinsOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"{self.path}: refusing to load the global {module}.{name}; this loader accepts pickles of builtin "
            "containers and scalars only (a pickle can run code when it loads a global)"
        )


def load_pickle_safely(path: str | os.PathLike) -> Any:
    """Loads a pickle that may only contain builtin containers and scalars.

    Args:
        path (`str` or `os.PathLike`):
            The pickle file.

    Returns:
        The unpickled object.

    Raises:
        `pickle.UnpicklingError`: the pickle refers to a global (a class or function), naming it and the file.
    """
    with open(path, "rb") as file:
        return _BuiltinsOnlyUnpickler(file, str(path)).load()
