"""Launch-option values as Xinference's CLI passes them (text, or numbers from the REST API): one
parser for whole numbers, one message format, for every option of every engine."""

from __future__ import annotations

from typing import Any, Optional


def whole_number(value: Any, where: str, minimum: int = 1, what: Optional[str] = None) -> int:
    """``value`` as an integer of at least ``minimum``; anything else (a fraction, a word, a
    boolean, too small) raises ``ValueError`` with ``where`` and the value in it.

    >>> whole_number("8192", "launch option context_length"), whole_number(4.0, "x"), whole_number("1_000", "x")
    (8192, 4, 1000)
    >>> whole_number("2.7", "launch option max_num_seqs")
    Traceback (most recent call last):
    ...
    ValueError: launch option max_num_seqs must be an integer >= 1, got '2.7'
    """
    error = ValueError(f"{where} must be {what or f'an integer >= {minimum}'}, got {value!r}")
    if isinstance(value, bool):
        raise error
    if isinstance(value, float):
        if not value.is_integer():
            raise error
        value = int(value)
    try:
        number = value if isinstance(value, int) else int(str(value).strip().replace("_", ""))
    except ValueError:
        raise error from None
    if number < minimum:
        raise error
    return number


def switch(value: Any, where: str) -> bool:
    """``value`` as true or false (``true``/``false``, ``1``/``0``, ``yes``/``no``, ``on``/``off``).

    >>> switch("True", "launch option enforce_eager"), switch(0, "x")
    (True, False)
    >>> switch("maybe", "launch option skip_memory_check")
    Traceback (most recent call last):
    ...
    ValueError: launch option skip_memory_check must be true or false, got 'maybe'
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{where} must be true or false, got {value!r}")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def byte_size(value: Any, where: str) -> int:
    """A memory size: bytes, or a number with a unit (``KB``/``MB``/``GB``: powers of 1000;
    ``KiB``/``MiB``/``GiB``: of 1024), case ignored.

    >>> byte_size("4GiB", "x"), byte_size("1.5 GB", "x"), byte_size(65536, "x"), byte_size("512mib", "x")
    (4294967296, 1500000000, 65536, 536870912)
    >>> byte_size("lots", "launch option kv_cache_memory")
    Traceback (most recent call last):
    ...
    ValueError: launch option kv_cache_memory must be a size such as 8GiB, 512MiB or a number of bytes, got 'lots'
    """
    error = ValueError(f"{where} must be a size such as 8GiB, 512MiB or a number of bytes, got {value!r}")
    if isinstance(value, bool):
        raise error
    text = str(value).strip().lower().replace("_", "")
    number = text.rstrip("kmgtib ")
    unit = text[len(number):].strip()
    try:
        size = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise error from None
    if not size >= 1 or size != size or size == float("inf"):
        raise error
    return int(size)
