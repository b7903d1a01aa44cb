"""Load pickled datasets without running code: an unpickler that only rebuilds Datasets and DataFrames.

`pickle.load` calls whatever the file names, so a `.pkl` from a course page or a forum can run any command. The
supported files (a pickled `datasets.Dataset`, or a pandas DataFrame of strings, ints and floats, as pickled by current
datasets/pandas with protocol 3-5) only need a short list of globals, each with one role:

- CALLS may be called with arguments taken from the file (the REDUCE opcode). Each is harmless whatever the
  arguments, or is wrapped here in a check (see `_checked_calls`).
- CLASSES are only created empty (NEWOBJ, without arguments, so no `__init__`/`__post_init__` runs) and then given
  their state once (BUILD), with the state's keys checked. Calling them is refused: `Value(dtype)` would call any
  zero-argument pyarrow function named by `dtype`, `ClassLabel(names_file=...)` reads any file, and
  `DatasetInfo(features=dict)` builds any feature type (Image, Audio: they read paths or URLs when decoded).
- ARGUMENTS are only handed to a CALL that checks them (`numpy.ndarray` to `_reconstruct`, `Index`/`RangeIndex` to
  `_new_Index`).

A name with a dot is refused for every module: pickle resolves `config.os.system` inside a module attribute by
attribute, which would reach whatever the module imports. The unpickler is the pure-Python one (`pickle._Unpickler`)
because the C one gives no hook on REDUCE, NEWOBJ and BUILD; every opcode that calls or changes an object is
overridden below, and the opcodes a supported file never holds (INST, OBJ, NEWOBJ_EX, EXT1/2/4) are refused. What the
file can still do: build lists, dicts, strings, bytes and numbers, and ask for the allowed objects. Without a global
that allows it the file cannot call `getattr`, so it never reaches a bound method. A file made to exhaust memory
(`bytearray(10**12)`) is not guarded against.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import io
import logging
import pickle
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CALLS: dict[str, frozenset[str]] = {
    "builtins": frozenset({"bytearray", "slice"}),
    "datasets.features.features": frozenset({"Features"}),  # Features(dict) only wraps the dict
    "numpy": frozenset({"dtype"}),
    "numpy._core.multiarray": frozenset({"_reconstruct"}),
    "numpy.core.multiarray": frozenset({"_reconstruct"}),  # the same function, named as numpy 1.x wrote it
    "numpy._core.numeric": frozenset({"_frombuffer"}),
    "numpy.core.numeric": frozenset({"_frombuffer"}),
    "pandas": frozenset({"StringDtype"}),
    "pandas._libs.internals": frozenset({"_unpickle_block"}),
    "pandas.core.indexes.base": frozenset({"_new_Index"}),
    "pandas.core.internals.managers": frozenset({"BlockManager"}),
    "pyarrow.lib": frozenset({"_reconstruct_record_batch", "_reconstruct_table", "_restore_array", "chunked_array",
                              "field", "large_list", "list_", "py_buffer", "schema", "type_for_alias"}),
}
CLASSES: dict[str, frozenset[str]] = {
    "datasets.arrow_dataset": frozenset({"Dataset"}),
    "datasets.features.features": frozenset({"ClassLabel", "LargeList", "List", "Value"}),
    "datasets.info": frozenset({"DatasetInfo"}),
    "datasets.splits": frozenset({"NamedSplit", "SplitDict", "SplitInfo"}),  # a Dataset from load_dataset
    "datasets.table": frozenset({"ConcatenationTable", "InMemoryTable"}),  # not MemoryMappedTable: it opens a path
    "datasets.utils.version": frozenset({"Version"}),
    "pandas": frozenset({"DataFrame"}),
    "pandas.core.frame": frozenset({"DataFrame"}),  # pandas < 3
    "pandas.arrays": frozenset({"ArrowStringArray"}),
}
ARGUMENTS: dict[str, frozenset[str]] = {
    "numpy": frozenset({"ndarray"}),
    "pandas": frozenset({"Index", "RangeIndex"}),
    "pandas.core.indexes.base": frozenset({"Index"}),  # pandas < 3
    "pandas.core.indexes.range": frozenset({"RangeIndex"}),
}
ALLOWED: dict[str, frozenset[str]] = {
    module: CALLS.get(module, frozenset()) | CLASSES.get(module, frozenset()) | ARGUMENTS.get(module, frozenset())
    for module in sorted({*CALLS, *CLASSES, *ARGUMENTS})
}


class UnsafePickleError(ValueError):
    """The pickle asks for something a pickled dataset never needs."""


class _Refused(Exception):
    """Raised where the path is unknown (inside a checked call); DatasetUnpickler.load adds it."""

    def __init__(self, what: str, risk: str = "loading it could run code") -> None:
        super().__init__(what)
        self.what, self.risk = what, risk


def _message(path: Path, what: str, risk: str = "loading it could run code") -> str:
    return (f"{path}: refused to load: the pickle {what} ({risk}). If you trust this file, pass --trust-pickle "
            f"(data.trust_pickle=true)")


def _name(obj: Any) -> str:
    if isinstance(obj, type) or callable(obj) and hasattr(obj, "__qualname__"):
        return f"{getattr(obj, '__module__', '?')}.{obj.__qualname__}"
    return f"a {type(obj).__module__}.{type(obj).__qualname__} object"


# --- checked calls ------------------------------------------------------------------------------------------------

def _validated(make: Any) -> Any:
    """pyarrow rebuilds arrays from the file's buffers without checking them: offsets past the end of a buffer make
    every later read return memory from outside the file. Arrow's full validation is the check it runs on IPC data."""

    @functools.wraps(make)
    def make_validated(*args: Any) -> Any:
        result = make(*args)
        try:
            result.validate(full=True)
        except Exception as error:  # pyarrow.ArrowInvalid, or an object that is no Arrow data at all
            raise _Refused(f"holds Arrow data that does not match its own layout ({error})",
                           "reading it would read memory outside the file") from None
        return result

    return make_validated


@functools.cache
def _checked_calls() -> dict[Any, Any]:
    """The real object -> what find_class hands out instead (also for the numpy 1.x / pandas 2 aliases)."""
    import numpy as np
    import pandas as pd
    import pyarrow.lib as palib
    from numpy._core.multiarray import _reconstruct
    from pandas.core.indexes.base import _new_Index
    from pandas.core.internals.blocks import Block, new_block
    from pandas.core.internals.managers import BlockManager

    def reconstruct(subtype: Any, shape: Any, typecode: Any) -> Any:
        # numpy pickles an array as _reconstruct(ndarray, (0,), b"b") and then its state (BUILD, which checks the
        # data against shape and dtype). Any other shape would be memory numpy never initialised.
        if subtype is not np.ndarray or shape != (0,):
            raise _Refused(f"rebuilds a numpy array as {_name(subtype)} of shape {shape!r:.40}, which a pickled "
                           f"dataset never needs", "reading it would read memory that was never written")
        return _reconstruct(subtype, shape, typecode)

    def new_index(cls: Any, d: Any) -> Any:
        # _new_Index(cls, d) runs cls.__new__(cls, **d): cls may only be Index or RangeIndex (both check d). Any
        # other allowed class is refused here, although a CLASSES entry's __new__ is object.__new__ (no code runs)
        # and a CALLS entry is no class (issubclass raises).
        if cls is not pd.Index and cls is not pd.RangeIndex or type(d) is not dict:
            raise _Refused(f"rebuilds a pandas index as {_name(cls)}, which a pickled dataset never needs")
        return _new_Index(cls, d)

    def block_manager(blocks: Any, axes: Any) -> Any:
        # pandas trusts the blocks' placements: _rebuild_blknos_and_blklocs writes to blknos[placement] without a
        # bounds check, so a placement past the columns writes outside the array (a crash, or worse). The axes and
        # values are copied first, so that no later opcode (an ndarray's one BUILD) can change what was checked.
        bad = _Refused("holds a DataFrame whose blocks do not match its columns", "loading it could corrupt memory")
        if type(blocks) not in (tuple, list) or type(axes) is not list or len(axes) != 2 \
                or not all(isinstance(axis, pd.Index) for axis in axes) \
                or not all(isinstance(block, Block) and block.ndim == 2 for block in blocks):
            raise bad
        axes = [axis.copy(deep=True) for axis in axes]
        blocks = [new_block(block.values.copy(), block.mgr_locs, ndim=2) for block in blocks]
        columns, rows = len(axes[0]), len(axes[1])
        seen: set[int] = set()
        for block in blocks:
            placement = [int(i) for i in block.mgr_locs.as_array]
            if block.shape != (len(placement), rows) or not all(0 <= i < columns for i in placement) \
                    or seen.intersection(placement) or len(set(placement)) != len(placement):
                raise bad
            seen.update(placement)
        if len(seen) != columns:
            raise bad
        return BlockManager(tuple(blocks), axes)

    validated = (palib._reconstruct_record_batch, palib._reconstruct_table, palib._restore_array,
                 palib.chunked_array)
    return {_new_Index: new_index, BlockManager: block_manager, _reconstruct: reconstruct,
            **{make: _validated(make) for make in validated}}


@functools.cache
def _resolve(module: str, name: str) -> tuple[str, Any]:
    """(role, object) for an allowed global. `name` has no dot, so this is one attribute of the module."""
    role = next(role for role, table in (("call", CALLS), ("class", CLASSES), ("argument", ARGUMENTS))
                if name in table.get(module, ()))
    obj = getattr(importlib.import_module(module), name)
    if role == "call":
        obj = _checked_calls().get(obj, obj)
    return role, obj


@functools.cache
def _numpy_makers() -> tuple[Any, ...]:
    """numpy's calls whose result gets its state next (BUILD)."""
    import numpy as np
    from numpy._core.multiarray import _reconstruct

    return np.dtype, _checked_calls()[_reconstruct]


@functools.cache
def _state_types() -> dict[type, dict[str, tuple[type, ...]]]:
    """Fields of BUILD states that later code trusts. DatasetInfo.copy() (Dataset.info) reruns __post_init__, which
    turns a dict in `features` or `post_processed` into feature objects (any type, and Value(dtype) calls a pyarrow
    function by name); Dataset and DataFrame read their tables and block manager as such."""
    import datasets
    import pandas as pd
    from datasets.table import ConcatenationTable, InMemoryTable
    from pandas.core.internals.managers import BlockManager

    tables = (InMemoryTable, ConcatenationTable)
    return {
        pd.DataFrame: {"_mgr": (BlockManager,)},  # only ever made by block_manager above, which checks it
        datasets.DatasetInfo: {"features": (datasets.Features, type(None)), "post_processed": (type(None),),
                               "splits": (datasets.splits.SplitDict, type(None))},
        datasets.Dataset: {"_data": tables, "_indices": (*tables, type(None)), "_info": (datasets.DatasetInfo,),
                           "_format_type": (str, type(None))},
    }


# --- the unpickler ------------------------------------------------------------------------------------------------

class DatasetUnpickler(pickle._Unpickler):  # type: ignore[misc]  # the pure-Python unpickler, for its opcode hooks
    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, handle: io.BufferedReader | io.BytesIO, path: Path) -> None:
        super().__init__(handle)
        self.path = path
        self._calls: dict[int, Any] = {}  # id -> object: what find_class handed out, by role
        self._classes: dict[int, Any] = {}
        self._fresh: dict[int, Any] = {}  # objects created here that have not been given their state yet

    def load(self) -> Any:
        try:
            return super().load()
        except _Refused as refused:
            raise UnsafePickleError(_message(self.path, refused.what, refused.risk)) from None
        except (UnsafePickleError, pickle.UnpicklingError, EOFError):
            raise
        except Exception as error:  # e.g. TypeError from a call with the wrong arguments: a broken file
            raise pickle.UnpicklingError(f"{type(error).__name__}: {error}") from None

    def refuse(self, what: str) -> UnsafePickleError:
        return UnsafePickleError(_message(self.path, f"{what}, which a pickled dataset never needs"))

    def find_class(self, module: str, name: str) -> Any:
        if "." in name:  # checked first: `config.os.system` would be looked up attribute by attribute
            raise UnsafePickleError(_message(
                self.path, f"asks for {module}.{name}, a dotted name that reaches inside {module} to whatever it "
                           f"imports, which a pickled dataset never needs"))
        if name not in ALLOWED.get(module, ()):
            raise self.refuse(f"asks for {module}.{name}")
        role, obj = _resolve(module, name)
        if role == "call":
            self._calls[id(obj)] = obj
        elif role == "class":
            self._classes[id(obj)] = obj
        return obj

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if id(func) not in self._calls:
            raise self.refuse(f"calls {_name(func)} with arguments")
        if type(args) is not tuple:
            raise pickle.UnpicklingError("REDUCE arguments are not a tuple")
        obj = func(*args)
        if any(func is maker for maker in _numpy_makers()):
            self._fresh[id(obj)] = obj
        self.stack[-1] = obj

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack[-1]
        if id(cls) not in self._classes:
            raise self.refuse(f"creates {_name(cls)} as a new object")
        if args != ():
            raise self.refuse(f"creates {_name(cls)} with arguments {args!r:.80}")
        obj = cls.__new__(cls)  # object.__new__ (dict.__new__ for SplitDict): no __init__ runs
        self._fresh[id(obj)] = obj
        self.stack[-1] = obj

    def load_build(self) -> None:
        import numpy as np

        state = self.stack[-1]
        inst = self.stack[-2]
        if self._fresh.pop(id(inst), None) is not inst:
            raise self.refuse(f"sets the state of {_name(inst)} that it did not just create")
        if isinstance(inst, np.dtype):
            # dtype(...) returns numpy's shared dtype objects: the state may only repeat what they hold
            if state != inst.__reduce__()[2]:
                raise self.refuse(f"changes the numpy dtype {inst}")
        elif type(inst) is not np.ndarray:  # an ndarray's __setstate__ checks the data against shape and dtype
            self._check_state(inst, state)
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]

    def _check_state(self, inst: Any, state: Any) -> None:
        """The state becomes the instance's attributes: it may not shadow a method (a callable or non-data
        descriptor on the class, which library code would then call), nor set a name outside a dataclass's fields."""
        cls = type(inst)
        if type(state) is not dict or not all(type(key) is str and not key.startswith("__") for key in state):
            raise self.refuse(f"sets {_name(inst)} from a state of another shape")
        fields = getattr(cls, "__dataclass_fields__", None) if is_dataclass(cls) else None
        for key, value in state.items():
            attribute = inspect.getattr_static(cls, key, None)
            kind = type(attribute)
            if (fields is not None and key not in fields) or callable(attribute) \
                    or (hasattr(kind, "__get__") and not hasattr(kind, "__set__")):
                raise self.refuse(f"sets {key!r} on {_name(inst)}")
            expected = _state_types().get(cls, {}).get(key)
            if expected is not None and not isinstance(value, expected):
                raise self.refuse(f"sets {key!r} on {_name(inst)} to {_name(value)}")
        if cls in _state_types() and _format_is_custom(state):
            raise self.refuse("sets a custom format (a function called on every row)")

    def load_setitem(self) -> None:
        self._check_container(self.stack[-3], (dict,), "SETITEM")
        pickle._Unpickler.load_setitem(self)  # type: ignore[attr-defined]

    def load_setitems(self) -> None:
        self._check_container(self._marked(), (dict,), "SETITEMS")
        pickle._Unpickler.load_setitems(self)  # type: ignore[attr-defined]

    def load_append(self) -> None:
        self._check_container(self.stack[-2], (list,), "APPEND")
        pickle._Unpickler.load_append(self)  # type: ignore[attr-defined]

    def load_appends(self) -> None:
        self._check_container(self._marked(), (list,), "APPENDS")
        pickle._Unpickler.load_appends(self)  # type: ignore[attr-defined]

    def load_additems(self) -> None:
        self._check_container(self._marked(), (set,), "ADDITEMS")
        pickle._Unpickler.load_additems(self)  # type: ignore[attr-defined]

    def _marked(self) -> Any:
        """The object below the last MARK: what SETITEMS, APPENDS and ADDITEMS add to (None if there is no MARK)."""
        return self.metastack[-1][-1] if self.metastack else None

    def _check_container(self, target: Any, kinds: tuple[type, ...], opcode: str) -> None:
        """These opcodes call target.__setitem__ / .extend / .add: only on plain containers (and SplitDict, whose
        __setitem__ only checks the key)."""
        from datasets.splits import SplitDict

        if type(target) not in kinds and not (kinds == (dict,) and type(target) is SplitDict):
            raise self.refuse(f"uses {opcode} on {_name(target)}")

    def load_unsupported(self) -> None:
        raise self.refuse("uses an opcode that calls a class (INST, OBJ or NEWOBJ_EX) or the extension registry")

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.APPEND[0]] = load_append
    dispatch[pickle.APPENDS[0]] = load_appends
    dispatch[pickle.ADDITEMS[0]] = load_additems
    for _opcode in (pickle.INST, pickle.OBJ, pickle.NEWOBJ_EX, pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_opcode[0]] = load_unsupported
    del _opcode


def _format_is_custom(state: dict[str, Any]) -> bool:
    return state.get("_format_type") == "custom" or "transform" in (state.get("_format_kwargs") or {})


def load_pickle(path: Path, *, trust: bool = False) -> Any:
    """Unpickle `path`; unless `trust`, only what rebuilding a Dataset or DataFrame needs."""
    with path.open("rb") as handle:
        if trust:
            log.warning("UNSAFE: %s is unpickled with no restriction (trust_pickle): it can run any code", path)
            return pickle.load(handle)
        return DatasetUnpickler(handle, path).load()
