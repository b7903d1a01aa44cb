"""Load pickled datasets without running code: an unpickler that only rebuilds Datasets and DataFrames.

`pickle.load` calls whatever the file names, so a `.pkl` from a course page or a forum can run any command. The
competition format (a pickled `datasets.Dataset`) only needs datasets' own classes, pyarrow's table reconstruction,
numpy arrays and a few builtins; everything else is refused, with the name of what the file asked for.
"""

from __future__ import annotations

import io
import logging
import pickle
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ALLOWED: dict[str, set[str]] = {
    "builtins": {"bytearray", "slice", "set", "frozenset", "complex", "range"},
    "datasets.arrow_dataset": {"Dataset"},
    "datasets.info": {"DatasetInfo"},
    "datasets.splits": {"NamedSplit", "Split", "SplitInfo", "SplitDict"},
    "datasets.table": {"InMemoryTable", "MemoryMappedTable", "ConcatenationTable"},
    "pyarrow.lib": {"_reconstruct_table", "_reconstruct_record_batch", "_restore_array", "chunked_array", "field",
                    "py_buffer", "schema", "type_for_alias", "table", "array", "list_", "large_list", "struct",
                    "dictionary", "timestamp", "time32", "time64", "date32", "date64", "binary", "string",
                    "large_string", "decimal128", "RecordBatch", "Table"},
    "numpy": {"ndarray", "dtype"},
    "numpy.core.multiarray": {"_reconstruct", "scalar"},
    "numpy._core.multiarray": {"_reconstruct", "scalar"},
    "numpy.core.numeric": {"_frombuffer"},
    "numpy._core.numeric": {"_frombuffer"},
    "pandas": {"DataFrame", "Index", "RangeIndex", "StringDtype", "CategoricalDtype", "Categorical"},
    "pandas.arrays": {"ArrowStringArray", "StringArray"},
    "pandas.core.frame": {"DataFrame"},
    "pandas.core.indexes.base": {"_new_Index", "Index"},
    "pandas.core.indexes.range": {"RangeIndex"},
    "pandas.core.internals.managers": {"BlockManager"},
    "pandas.core.internals.blocks": {"new_block"},
    "pandas._libs.internals": {"_unpickle_block"},
}
# Feature types (Value, ClassLabel, List, ...) are plain dataclasses describing columns.
ALLOWED_MODULES = ("datasets.features.features",)


class UnsafePickleError(ValueError):
    """The pickle asks for something a pickled dataset never needs."""


class DatasetUnpickler(pickle.Unpickler):
    def __init__(self, handle: io.BufferedReader, path: Path) -> None:
        super().__init__(handle)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if name in ALLOWED.get(module, ()) or (module in ALLOWED_MODULES and not name.startswith("_")):
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self.path}: refused to load: the pickle asks for {module}.{name}, which a pickled dataset never "
            f"needs (loading it could run code). If you trust this file, pass --trust-pickle (data.trust_pickle=true)")


def load_pickle(path: Path, *, trust: bool = False) -> Any:
    """Unpickle `path`; unless `trust`, only what rebuilding a Dataset or DataFrame needs."""
    with path.open("rb") as handle:
        if trust:
            log.warning("UNSAFE: %s is unpickled with no restriction (trust_pickle): it can run any code", path)
            return pickle.load(handle)
        return DatasetUnpickler(handle, path).load()
