"""The ways out of the restricted unpickler (issue 13): each hostile pickle is refused and its payload never runs.

The payloads are written opcode by opcode (checked with pickletools), or pickled from a small `_Call` object whose
`__reduce__` names the function to call. Where it helps, a test first shows with a plain `pickle.loads` that the
payload really does what it is meant to (creates the marker file, prints, reads another file).
"""

from __future__ import annotations

import pickle
import re
import struct
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from datasets.features.features import ClassLabel, Value
from datasets.table import ConcatenationTable, MemoryMappedTable
from pandas._libs.internals import BlockPlacement
from pandas.core.internals.blocks import new_block
from pandas.core.internals.managers import BlockManager
from pyarrow.lib import _restore_array

from budgetlora.config import DataConfig
from budgetlora.data import DataError, load_table
from budgetlora.safe_pickle import ALLOWED, ARGUMENTS, CALLS, CLASSES, UnsafePickleError, _resolve, load_pickle

from .conftest import SHARED_DATA

COMPETITION_FILE = SHARED_DATA / "competition" / "test_unlabelled.pkl"
REFUSED = r": refused to load: the pickle "
TRUST_HINT = "If you trust this file, pass --trust-pickle (data.trust_pickle=true)"


# --- writing pickles by hand ------------------------------------------------------------------------------------

def text(value: str, protocol: int = 4) -> bytes:
    """SHORT_BINUNICODE (protocol 4+) or BINUNICODE (protocol 2-3)."""
    data = value.encode()
    if protocol >= 4 and len(data) < 256:
        return b"\x8c" + bytes([len(data)]) + data
    return b"X" + struct.pack("<I", len(data)) + data


def global_ref(module: str, name: str, opcode: str = "STACK_GLOBAL", protocol: int = 4) -> bytes:
    if opcode == "GLOBAL":  # `c` module \n name \n, every protocol
        return b"c" + module.encode() + b"\n" + name.encode() + b"\n"
    return text(module, protocol) + text(name, protocol) + b"\x93"  # STACK_GLOBAL, protocol 4+


def call(module: str, name: str, *args: str, opcode: str = "STACK_GLOBAL", protocol: int = 4) -> bytes:
    """PROTO, the global, MARK, the string arguments, TUPLE, REDUCE, STOP: `module.name(*args)`."""
    arguments = b"(" + b"".join(text(arg, protocol) for arg in args) + b"t"
    return b"\x80" + bytes([protocol]) + global_ref(module, name, opcode, protocol) + arguments + b"R."


def new_object(module: str, name: str, state: bytes) -> bytes:
    """EMPTY_TUPLE, NEWOBJ, then BUILD with `state` (opcodes that leave one object): what pickle writes for a class."""
    return global_ref(module, name) + b")\x81" + state + b"b"


def state_dict(**items: bytes) -> bytes:
    return b"}" + b"".join(text(key) + value + b"s" for key, value in items.items())


class _Call:
    """Pickles as `func(*args)`: pickle writes the global for func and REDUCE."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.func, self.args


def write(tmp_path: Path, data: bytes, name: str = "evil.pkl") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def refused(path: Path, what: str) -> Any:
    return pytest.raises(UnsafePickleError, match=f"^{re.escape(str(path))}{REFUSED}{what}")


# --- dotted names -------------------------------------------------------------------------------------------------

ENCODINGS = [("GLOBAL", 2), ("GLOBAL", 3), ("GLOBAL", 4), ("STACK_GLOBAL", 4), ("STACK_GLOBAL", 5)]
DOTTED = ["config.os.system", "os.system", "sys.modules", "np.load", "pd.read_pickle", "__builtins__.eval"]


def dotted_payload(module: str, name: str, marker: Path, opcode: str, protocol: int) -> bytes:
    arg = f"open({str(marker)!r}, 'w')" if name.endswith("eval") else f"touch {marker}"
    return call(module, name, arg, opcode=opcode, protocol=protocol)


def test_the_dotted_name_payload_runs_a_command_when_unrestricted(tmp_path: Path) -> None:
    """The hole of issue 13: `config.os.system` inside an allowed module is os.system (84 bytes for a short path)."""
    marker = tmp_path / "m"
    data = dotted_payload("datasets.features.features", "config.os.system", marker, "STACK_GLOBAL", 4)
    pickle.loads(data)  # noqa: S301 - the point: unrestricted, it runs
    assert marker.exists()


@pytest.mark.parametrize("name", DOTTED)
@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_dotted_names_are_refused_in_every_allowed_module(tmp_path: Path, module: str, name: str) -> None:
    marker = tmp_path / "pwned"
    for opcode, protocol in ENCODINGS:
        path = write(tmp_path, dotted_payload(module, name, marker, opcode, protocol), f"{opcode}{protocol}.pkl")
        with refused(path, rf"asks for {re.escape(module)}\.{re.escape(name)}, a dotted name that reaches inside"):
            load_pickle(path)
        assert not marker.exists()


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_a_dotted_name_below_an_allowed_name_is_refused(tmp_path: Path, module: str) -> None:
    """E.g. Dataset.from_file (reads a path) or Value.__init__: one level below an allowed name is still a dot."""
    for allowed in sorted(ALLOWED[module]):
        for attribute in ("from_file", "__init__", "__globals__"):
            path = write(tmp_path, call(module, f"{allowed}.{attribute}", "x"))
            with refused(path, rf"asks for {re.escape(module)}\.{re.escape(allowed)}\.{attribute}, a dotted name"):
                load_pickle(path)


def test_the_dotted_name_payload_is_a_data_error_for_train_and_predict(tmp_path: Path) -> None:
    """load_table is what `budgetlora train` and `predict --input evil.pkl` read the file with."""
    marker = tmp_path / "pwned"
    path = write(tmp_path, dotted_payload("datasets.features.features", "config.os.system", marker, "STACK_GLOBAL", 4))
    expected = (f"{path}: refused to load: the pickle asks for datasets.features.features.config.os.system, a dotted "
                f"name that reaches inside datasets.features.features to whatever it imports, which a pickled dataset "
                f"never needs (loading it could run code). {TRUST_HINT}")
    with pytest.raises(DataError, match=f"^{re.escape(expected)}$"):
        load_table(str(path), DataConfig(), labelled=False)
    assert not marker.exists()


# --- names that are not allowed -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "args"), [
    ("open", ("{marker}", "w")), ("eval", ("open({marker!r}, 'w')",)), ("exec", ("open({marker!r}, 'w')",)),
    ("__import__", ("os",)), ("getattr", ("os", "system")), ("compile", ("1", "f", "eval")),
])
def test_builtins_that_run_code_or_open_files_are_refused(tmp_path: Path, name: str, args: tuple[str, ...]) -> None:
    marker = tmp_path / "pwned"
    path = write(tmp_path, call("builtins", name, *(arg.format(marker=str(marker)) for arg in args)))
    with refused(path, rf"asks for builtins\.{re.escape(name)}, which a pickled dataset never needs"):
        load_pickle(path)
    assert not marker.exists()


@pytest.mark.parametrize(("module", "name"), [
    ("os", "system"), ("posix", "system"), ("subprocess", "run"), ("datasets.features.features", "Image"),
    ("datasets.features.features", "generate_from_dict"), ("datasets.arrow_dataset", "_concatenate_map_style_datasets"),
    ("pyarrow.lib", "table"), ("numpy", "load"), ("pandas", "read_pickle"), ("__builtin__", "bytearray"),
    ("_codecs", "encode"), ("copyreg", "_reconstructor"), ("numpy.core.multiarray", "scalar"),
])
def test_names_outside_the_list_are_refused(tmp_path: Path, module: str, name: str) -> None:
    path = write(tmp_path, call(module, name, "x"))
    with refused(path, rf"asks for {re.escape(module)}\.{re.escape(name)}, which a pickled dataset never needs"):
        load_pickle(path)


# --- hostile arguments to allowed objects -------------------------------------------------------------------------

def test_calling_value_would_call_a_pyarrow_function_by_name_and_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Value.__post_init__ runs pyarrow.<dtype>(): any zero-argument pyarrow function (show_versions prints,
    create_library_symlinks writes into site-packages, get_library_dirs runs pkg-config)."""
    data = pickle.dumps(_Call(Value, "show_versions"), protocol=4)
    pickle.loads(data)  # noqa: S301
    assert "pyarrow version info" in capsys.readouterr().out
    path = write(tmp_path, data)
    with refused(path, r"calls datasets\.features\.features\.Value with arguments, which a pickled dataset never"):
        load_pickle(path)
    assert capsys.readouterr().out == ""


def test_calling_classlabel_would_read_any_file_and_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2\nswordfish\n", encoding="utf-8")
    data = pickle.dumps(_Call(ClassLabel, None, None, str(secret)), protocol=4)
    assert pickle.loads(data).names == ["hunter2", "swordfish"]  # noqa: S301
    path = write(tmp_path, data)
    with refused(path, r"calls datasets\.features\.features\.ClassLabel with arguments"):
        load_pickle(path)


def test_calling_datasetinfo_with_a_feature_dict_is_refused(tmp_path: Path) -> None:
    """DatasetInfo.__post_init__ builds features from a dict: here an Image feature, which reads paths or URLs."""
    data = pickle.dumps(_Call(datasets.DatasetInfo, "", "", "", "", {"img": {"_type": "Image"}}), protocol=4)
    assert type(pickle.loads(data).features["img"]).__name__ == "Image"  # noqa: S301
    path = write(tmp_path, data)
    with refused(path, r"calls datasets\.info\.DatasetInfo with arguments"):
        load_pickle(path)


@pytest.fixture()
def arrow_file_elsewhere(tmp_path: Path) -> Path:
    """An Arrow stream file outside the pickle, e.g. another user's data or a cache file."""
    path = tmp_path / "elsewhere" / "secret.arrow"
    path.parent.mkdir()
    table = pa.table({"text": ["the secret row"]})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return path


@pytest.mark.parametrize("wrap", ["table", "concatenation", "dataset"])
def test_a_memory_mapped_table_pointing_at_another_file_is_refused(
        tmp_path: Path, arrow_file_elsewhere: Path, wrap: str) -> None:
    """MemoryMappedTable's state is a path that unpickling opens: a pickle could read any Arrow file."""
    table = MemoryMappedTable.from_file(str(arrow_file_elsewhere))
    obj: Any = {"table": table, "concatenation": ConcatenationTable.from_tables([table]),
                "dataset": datasets.Dataset(table)}[wrap]
    data = pickle.dumps(obj, protocol=4)
    assert b"the secret row" not in data
    unrestricted = pickle.loads(data)  # noqa: S301
    assert "the secret row" in str((unrestricted.data if wrap == "dataset" else unrestricted).to_pydict())
    path = write(tmp_path, data)
    with refused(path, r"asks for datasets\.table\.MemoryMappedTable, which a pickled dataset never needs"):
        load_pickle(path)


def test_arrow_buffers_that_overrun_are_refused(tmp_path: Path) -> None:
    """pyarrow rebuilds an array from the file's buffers unchecked: an offset past the data reads outside it."""
    offsets = struct.pack("<ii", 0, 4000)
    data = pickle.dumps(_Call(_restore_array, (pa.string(), 1, 0, 0, [None, pa.py_buffer(offsets),
                                                                       pa.py_buffer(b"abc")], [], None)), protocol=4)
    with pytest.raises(pa.ArrowInvalid, match="out of bounds"):
        pickle.loads(data).validate(full=True)  # noqa: S301 - built, never read
    path = write(tmp_path, data)
    with refused(path, r"holds Arrow data that does not match its own layout \(.*out of bounds.*\) \(reading it "
                       r"would read memory outside the file\)"):
        load_pickle(path)


def block_manager_pickle(placements: list[list[int]], columns: list[str]) -> bytes:
    """A DataFrame of int blocks at the given column positions, pickled the way pandas pickles one."""
    blocks = tuple(new_block(np.arange(2 * len(p)).reshape(len(p), 2) + 10 * i,
                             BlockPlacement(np.array(p, dtype=np.intp)), ndim=2) for i, p in enumerate(placements))
    manager = BlockManager(blocks, [pd.Index(columns), pd.RangeIndex(2)], verify_integrity=False)
    return pickle.dumps(pd.DataFrame._from_mgr(manager, axes=manager.axes), protocol=5)


@pytest.mark.parametrize("placements", [[[3]], [[100_000_000]], [[-5]], [[0], [0]], [[0, 0]], [[1]]])
def test_a_dataframe_whose_blocks_point_past_its_columns_is_refused(tmp_path: Path, placements: list[list[int]]) -> \
        None:
    """pandas writes blknos[placement] without a bounds check (measured: a segfault with 100_000_000, and with 3 a
    crash at exit); every placement must name each column exactly once."""
    columns = ["label"] if len(placements) == 1 and len(placements[0]) == 1 else ["a", "b"]
    path = write(tmp_path, block_manager_pickle(placements, columns))
    with refused(path, r"holds a DataFrame whose blocks do not match its columns \(loading it could corrupt memory"):
        load_pickle(path)
    with pytest.raises(DataError, match="blocks do not match its columns"):
        load_table(str(path), DataConfig(), labelled=False)


def test_a_dataframe_with_valid_blocks_in_any_order_loads(tmp_path: Path) -> None:
    path = write(tmp_path, block_manager_pickle([[1], [0]], ["a", "b"]))
    assert load_pickle(path).to_dict(orient="list") == {"a": [10, 11], "b": [0, 1]}


def test_numpy_reconstruct_only_builds_empty_ndarrays(tmp_path: Path) -> None:
    """_reconstruct(cls, shape, typecode) creates a cls of that shape, uninitialised until its state comes. The class
    can only come from find_class (an allowed one; numpy itself refuses any that is not an ndarray subtype); both
    class and shape must be what numpy writes: ndarray, (0,)."""
    reconstruct = global_ref("numpy._core.multiarray", "_reconstruct")
    for cls in (global_ref("datasets.arrow_dataset", "Dataset"), global_ref("pandas", "DataFrame")):
        path = write(tmp_path, b"\x80\x04" + reconstruct + cls + b"K\x00\x85C\x01b\x87R.")
        with refused(path, r"rebuilds a numpy array as (datasets\.arrow_dataset\.Dataset|pandas\.DataFrame) of shape"):
            load_pickle(path)
    path = write(tmp_path, b"\x80\x04" + reconstruct + global_ref("numpy", "ndarray") + b"M\x00\x10\x85C\x01b\x87R.")
    with refused(path, r"rebuilds a numpy array as numpy\.ndarray of shape \(4096,\), .*\(reading it would read memory "
                       r"that was never written\)"):
        load_pickle(path)
    path = write(tmp_path, b"\x80\x04" + reconstruct + global_ref("builtins", "open") + b"K\x00\x85C\x01b\x87R.")
    with refused(path, r"asks for builtins\.open"):
        load_pickle(path)


def test_numpy_frombuffer_refuses_object_arrays(tmp_path: Path) -> None:
    """Object arrays from raw bytes would be pointers forged by the file: numpy refuses them."""
    dtype = global_ref("numpy", "dtype") + text("O") + b"\x89\x88\x87R"  # dtype("O", False, True)
    frombuffer = global_ref("numpy._core.numeric", "_frombuffer")
    arguments = b"(C\x08" + b"\x00" * 8 + dtype + b"K\x01\x85" + text("C") + b"t"  # (bytes, dtype, (1,), "C")
    path = write(tmp_path, b"\x80\x05" + frombuffer + arguments + b"R.")
    with pytest.raises(pickle.UnpicklingError, match="cannot create an OBJECT array from memory buffer"):
        load_pickle(path)


@pytest.mark.parametrize("cls", [("datasets.arrow_dataset", "Dataset"), ("datasets.features.features", "Value"),
                                 ("numpy", "ndarray"), ("pyarrow.lib", "py_buffer")])
def test_new_index_only_rebuilds_pandas_indexes(tmp_path: Path, cls: tuple[str, str]) -> None:
    """_new_Index(cls, d) runs cls.__new__(cls, **d): cls may only be Index or RangeIndex."""
    d = state_dict(dtype=text("show_versions"))
    path = write(tmp_path, b"\x80\x04" + global_ref("pandas.core.indexes.base", "_new_Index") + global_ref(*cls)
                 + d + b"\x86R.")
    with refused(path, rf"rebuilds a pandas index as {re.escape('.'.join(cls))}"):
        load_pickle(path)


# --- object state (BUILD) and the other opcodes that call something ---------------------------------------------

PY_BUFFER = global_ref("pyarrow.lib", "py_buffer")
FEATURES = global_ref("datasets.features.features", "Features")


@pytest.mark.parametrize(("payload", "what"), [
    # a method shadowed by an attribute that library code would then call
    (new_object("datasets.features.features", "Value", state_dict(dtype=text("string"), decode_example=PY_BUFFER)),
     r"sets 'decode_example' on a datasets\.features\.features\.Value object"),
    (new_object("pandas", "DataFrame", state_dict(to_dict=PY_BUFFER)), r"sets 'to_dict' on a pandas\.DataFrame"),
    (new_object("datasets.arrow_dataset", "Dataset", state_dict(__setstate__=PY_BUFFER)),
     r"sets a datasets\.arrow_dataset\.Dataset object from a state of another shape"),
    (new_object("datasets.arrow_dataset", "Dataset", state_dict(_format_type=text("custom"))),
     r"sets a custom format"),
    # DatasetInfo.copy() (Dataset.info) would rebuild any feature type from a dict
    (new_object("datasets.info", "DatasetInfo", state_dict(features=b"}" + text("img") + b"}" + text("_type")
                                                            + text("Image") + b"ss")),
     r"sets 'features' on a datasets\.info\.DatasetInfo object to a builtins\.dict object"),
    (new_object("datasets.arrow_dataset", "Dataset", state_dict(_data=b"}")),
     r"sets '_data' on a datasets\.arrow_dataset\.Dataset object to a builtins\.dict"),
    # (dict, slotstate): slot state is setattr, e.g. __class__
    (global_ref("datasets.features.features", "Value") + b")\x81" + b"N" + state_dict(__class__=PY_BUFFER)
     + b"\x86b", r"sets a datasets\.features\.features\.Value object from a state of another shape"),
    # a second BUILD on the same object, BUILD on an object made by a call
    (new_object("datasets.features.features", "Value", state_dict(dtype=text("string"))) + b"}b",
     r"sets the state of a datasets\.features\.features\.Value object that it did not just create"),
    (FEATURES + b"}\x85R" + state_dict(_column_requires_decoding=b"}") + b"b",
     r"sets the state of a datasets\.features\.features\.Features object that it did not just create"),
    # numpy's dtype() returns its shared dtype objects: their state may not change
    (global_ref("numpy", "dtype") + b"(" + text("i8") + b"\x89\x88tR" + b"(K\x03" + text(">")
     + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb", r"changes the numpy dtype int64"),
    # creating a class with arguments, calling a class that is only created empty, calling an argument-only class
    (global_ref("datasets.features.features", "Value") + b"(" + text("show_versions") + b"t\x81",
     r"creates datasets\.features\.features\.Value with arguments"),
    (global_ref("pandas", "Index") + b"(" + text("x") + b"tR", r"calls pandas\.Index with arguments"),
    (global_ref("builtins", "slice") + b")\x81", r"creates builtins\.slice as a new object"),
    # SETITEM / APPEND / ADDITEMS call methods of their target: only on plain containers
    (global_ref("pandas", "DataFrame") + b")\x81" + text("x") + PY_BUFFER + b"s",
     r"uses SETITEM on a pandas\.DataFrame"),
    (FEATURES + b"}\x85R" + b"(" + text("x") + PY_BUFFER + b"u", r"uses SETITEMS on a datasets\.features\.features"),
    (global_ref("builtins", "bytearray") + b")R" + b"K\x01a", r"uses APPEND on a builtins\.bytearray object"),
    (global_ref("builtins", "bytearray") + b")R" + b"(K\x01e", r"uses APPENDS on a builtins\.bytearray object"),
    # opcodes a supported file never holds: they call a class with arguments, or use the extension registry
    (b"\x92", r"uses an opcode that calls a class"),  # NEWOBJ_EX
    (b"\x82\x01", r"uses an opcode that calls a class"),  # EXT1
])
def test_hostile_object_state_and_opcodes_are_refused(
        tmp_path: Path, payload: bytes, what: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, b"\x80\x04" + payload + b".")
    with refused(path, what):
        load_pickle(path)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("opcode", ["INST", "OBJ"])
def test_protocol_0_and_1_class_calls_are_refused(
        tmp_path: Path, opcode: str, capsys: pytest.CaptureFixture[str]) -> None:
    """INST / OBJ call a class with arguments (protocol 0/1): Value('show_versions') would print."""
    if opcode == "INST":
        data = b"(" + text("show_versions", 2) + b"idatasets.features.features\nValue\n."
    else:
        data = b"(" + global_ref("datasets.features.features", "Value", "GLOBAL") + text("show_versions", 2) + b"o."
    path = write(tmp_path, data)
    with refused(path, r"uses an opcode that calls a class"):
        load_pickle(path)
    assert capsys.readouterr().out == ""


def test_a_broken_call_is_a_readable_error(tmp_path: Path) -> None:
    path = write(tmp_path, call("pyarrow.lib", "schema", "not fields"))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: not a readable pickle \(UnpicklingError: "):
        load_table(str(path), DataConfig(), labelled=False)


# --- what the list allows -----------------------------------------------------------------------------------------

def test_every_allowed_name_exists_and_the_aliases_are_the_same_objects() -> None:
    roles = {}
    for module, names in ALLOWED.items():
        for name in names:
            roles[module, name] = _resolve(module, name)
    assert {role for role, _ in roles.values()} == {"call", "class", "argument"}
    assert sum(len(names) for names in ALLOWED.values()) == sum(
        len(table.get(module, ())) for module in ALLOWED for table in (CALLS, CLASSES, ARGUMENTS))  # one role each
    for old, new in [(("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")),
                     (("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")),
                     (("pandas.core.frame", "DataFrame"), ("pandas", "DataFrame")),
                     (("pandas.core.indexes.base", "Index"), ("pandas", "Index")),
                     (("pandas.core.indexes.range", "RangeIndex"), ("pandas", "RangeIndex"))]:
        assert roles[old] == roles[new]
    assert roles["datasets.table", "InMemoryTable"][1] is datasets.table.InMemoryTable
    assert not any(name.startswith("MemoryMapped") for names in ALLOWED.values() for name in names)


# --- the files that must still load -------------------------------------------------------------------------------

@pytest.mark.skipif(not COMPETITION_FILE.is_file(),
                    reason=f"needs the competition's pickled Dataset from the shared data folder ({COMPETITION_FILE} "
                           f"is absent)")
def test_the_competition_file_loads_safely() -> None:
    dataset = load_pickle(COMPETITION_FILE)
    assert isinstance(dataset, datasets.Dataset)
    texts = dataset["text"]
    assert len(texts) == 8000 and all(isinstance(t, str) and t for t in texts)
    with COMPETITION_FILE.open("rb") as handle:
        assert texts == pickle.load(handle)["text"]  # noqa: S301 - the known file, read the unrestricted way
    table = load_table(str(COMPETITION_FILE), DataConfig(), labelled=False)
    assert table["text"][:] == [t.strip() for t in texts]


@pytest.fixture()
def rows() -> dict[str, list[Any]]:
    return {"text": ["Wall St. rallies", "Cubs win", "New chip ships", "Talks stall"], "label": [2, 1, 3, 0]}


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_pickled_datasets_load(tmp_path: Path, rows: dict[str, list[Any]], protocol: int) -> None:
    features = datasets.Features({"text": Value("string"), "label": ClassLabel(names=["W", "S", "B", "T"]),
                                  "ids": datasets.List(Value("int32")), "big": datasets.LargeList(Value("int64")),
                                  "score": Value("float32")})
    full = {**rows, "ids": [[1, 2], [], [3], [4]], "big": [[5]] * 4, "score": [0.5, 1.0, 1.5, 2.0]}
    plain = datasets.Dataset.from_dict(rows)
    cases = {"shuffled": plain.shuffle(seed=0),
             "features": datasets.Dataset.from_dict(full, features=features).shuffle(seed=1),
             "concatenated": datasets.concatenate_datasets([plain, plain]).select([5, 0, 2])}
    for name, dataset in cases.items():
        path = write(tmp_path, pickle.dumps(dataset, protocol=protocol), f"{name}.pkl")
        loaded = load_pickle(path)
        assert loaded.column_names == dataset.column_names
        assert all(loaded[column] == dataset[column] for column in dataset.column_names), name


def test_a_dataset_from_load_dataset_in_memory_loads(tmp_path: Path, rows: dict[str, list[Any]]) -> None:
    """load_dataset's info carries splits and a version (datasets.splits, datasets.utils.version)."""
    pd.DataFrame(rows).to_csv(tmp_path / "rows.csv", index=False)
    dataset = datasets.load_dataset("csv", data_files=str(tmp_path / "rows.csv"), split="train", keep_in_memory=True,
                                    cache_dir=str(tmp_path / "hf-cache"))
    path = write(tmp_path, pickle.dumps(dataset))
    assert load_pickle(path)["text"] == rows["text"]


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_pickled_dataframes_load(tmp_path: Path, rows: dict[str, list[Any]], protocol: int) -> None:
    frames = {"ints": pd.DataFrame(rows).sample(frac=1, random_state=0),
              "strings_floats": pd.DataFrame({"text": rows["text"], "label": ["B", "S", "T", "W"],
                                              "score": [0.5, 1.0, 1.5, 2.0]}),
              "object_strings": pd.DataFrame({"text": pd.array(rows["text"], dtype=object), "label": rows["label"]})}
    for name, frame in frames.items():
        path = write(tmp_path, pickle.dumps(frame, protocol=protocol), f"{name}.pkl")
        loaded = load_pickle(path)
        assert loaded.equals(frame), name
        assert loaded.to_dict(orient="list") == frame.to_dict(orient="list")
