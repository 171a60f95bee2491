"""``Record``: one decoded data record, a read-only mapping from IANA names to typed values.

Decoding produces many records per datagram, so a record is a light view: the tuple of values plus a shape
shared by every record of the same template and domain (keys, key index, template id, domain, options flag).
Building one costs an object and one slot instead of a dict (the decoder makes records of a per-shape
subclass, ``RecordShape.record_type()``, that holds the shape as a class attribute); ``dict(record)`` or
``record.to_dict()`` materialises it when a real dict is needed (e.g. ``json.dumps``).
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterator, KeysView, Mapping, Sequence, ValuesView
from typing import Any

__all__ = ["Record", "RecordShape"]


class RecordShape:
    """What the records of one (template, domain) share."""

    __slots__ = ("_record_type", "domain", "index", "keys", "options", "template_id")

    def __init__(self, keys: Sequence[str], *, template_id: int, domain: int, options: bool) -> None:
        self.keys = tuple(keys)
        self.index = {key: i for i, key in enumerate(self.keys)}
        self.template_id = template_id
        self.domain = domain
        self.options = options
        self._record_type: type[Record] | None = None

    def record_type(self) -> type[Record]:
        """A ``Record`` subclass whose instances have this shape as a class attribute.

        The decoder's record builders make each record with ``cls()`` (no ``__init__`` of ours, no
        per-record shape store) and set only ``row``: creating records is a large part of decoding. Made on
        first use and kept with the shape (a shape lives as long as its template layout).
        """
        cls = self._record_type
        if cls is None:
            namespace = {"__slots__": (), "__init__": object.__init__, "shape": self, "__module__": __name__}
            cls = self._record_type = type("Record", (Record,), namespace)
            cls.__qualname__ = "Record"
        return cls


class Record(Mapping[str, object]):
    """A decoded data record: ``Mapping[str, object]`` keyed by IANA names (see ``fields`` for value types).

    ``template_id`` (0 for v5), ``domain`` (observation domain / source id / v5 ``engine_type << 8 |
    engine_id``) and ``options`` (True for records of an options template) say where it came from.
    """

    # Public so that hot loops (the decode CLI's JSON writer, the store) read values without a dict per
    # record; treat both as read-only.
    __slots__ = ("row", "shape")

    def __init__(self, values: Sequence[object], shape: RecordShape) -> None:
        if len(values) != len(shape.keys):
            raise ValueError(f"record of {len(values)} values for {len(shape.keys)} keys")
        self.row = values
        self.shape = shape

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, object], *, template_id: int = 0, domain: int = 0, options: bool = False
    ) -> Record:
        """A record holding ``data`` (for tests and tools that build records by hand)."""
        shape = RecordShape(list(data), template_id=template_id, domain=domain, options=options)
        return cls(tuple(data.values()), shape)

    @property
    def template_id(self) -> int:
        return self.shape.template_id

    @property
    def domain(self) -> int:
        return self.shape.domain

    @property
    def options(self) -> bool:
        return self.shape.options

    def __getitem__(self, key: str) -> object:
        return self.row[self.shape.index[key]]

    def get(self, key: str, default: Any = None) -> Any:
        i = self.shape.index.get(key)
        return default if i is None else self.row[i]

    def __contains__(self, key: object) -> bool:
        return key in self.shape.index

    def __iter__(self) -> Iterator[str]:
        return iter(self.shape.keys)

    def __len__(self) -> int:
        return len(self.shape.keys)

    def keys(self) -> KeysView[str]:
        return self.to_dict().keys()

    def values(self) -> ValuesView[object]:
        return self.to_dict().values()

    def items(self) -> ItemsView[str, object]:
        return self.to_dict().items()

    def to_dict(self) -> dict[str, object]:
        return dict(zip(self.shape.keys, self.row, strict=True))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Record):
            return self.shape.keys == other.shape.keys and tuple(self.row) == tuple(other.row)
        if isinstance(other, Mapping):
            return self.to_dict() == dict(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Record(template_id={self.template_id}, domain={self.domain}, {self.to_dict()!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        shape = self.shape
        return (
            _rebuild,
            (tuple(self.row), shape.keys, shape.template_id, shape.domain, shape.options),
        )


def _rebuild(
    values: tuple[object, ...], keys: tuple[str, ...], template_id: int, domain: int, options: bool
) -> Record:
    return Record(values, RecordShape(keys, template_id=template_id, domain=domain, options=options))
