"""Window choices of a token set, checked without torch (a study config checks them when it is read).

See :mod:`evoprune.evaluators._tokens` for what each choice means.
"""

from __future__ import annotations

__all__ = ["WINDOW_MODES", "check_window_offsets", "normalize_windows"]

#: The named window choices of :func:`make_token_set` (besides a list of offsets).
WINDOW_MODES: tuple[str, ...] = ("random", "first")


def normalize_windows(windows: object, *, what: str = "windows") -> str | tuple[int, ...]:
    """``"random"``, ``"first"`` or a tuple of distinct window offsets ``>= 0``; one-line errors.

    >>> normalize_windows("first"), normalize_windows([0, 512, 256])
    ('first', (0, 512, 256))
    >>> normalize_windows([0, "8"])
    Traceback (most recent call last):
    ...
    ValueError: windows[1] is '8'; window offsets are ints (token indices), e.g. [0, 4096, 8192].
    """
    if windows is None:
        return "random"
    if isinstance(windows, str):
        if windows in WINDOW_MODES:
            return windows
        raise ValueError(f"{what} must be 'random', 'first' or a list of window start offsets (token indices), "
                         f"got {windows!r}.")
    if type(windows).__module__.split(".")[0] in ("torch", "numpy") and hasattr(windows, "tolist"):
        windows = windows.tolist()
    if not isinstance(windows, (list, tuple)):
        raise ValueError(f"{what} must be 'random', 'first' or a list of window start offsets (token indices), "
                         f"got {windows!r}.")
    if not windows:
        raise ValueError(f"{what} is an empty list; give window start offsets (e.g. [0, 4096]), 'first' or 'random'.")
    out: list[int] = []
    for i, w in enumerate(windows):
        if isinstance(w, bool) or not isinstance(w, int):
            raise ValueError(f"{what}[{i}] is {w!r}; window offsets are ints (token indices), e.g. [0, 4096, 8192].")
        if w < 0:
            raise ValueError(f"{what}[{i}] is {w}; window offsets are token indices >= 0.")
        out.append(int(w))
    if len(set(out)) != len(out):
        dup = next(w for w in out if out.count(w) > 1)
        raise ValueError(f"{what} lists offset {dup} twice; give each window once.")
    return tuple(out)


def check_window_offsets(
    offsets: tuple[int, ...], seq_len: int, *, length: int | None = None, what: str = "windows"
) -> None:
    """One-line errors for window offsets that overlap at ``seq_len`` or (given the data's ``length``)
    run past its end."""
    ordered = sorted(offsets)
    for a, b in zip(ordered, ordered[1:]):
        if b - a < seq_len:
            raise ValueError(f"{what}: the windows at offsets {a} and {b} overlap at seq_len {seq_len}; space the "
                             f"offsets at least {seq_len} apart (or use 'first').")
    if length is not None and ordered and ordered[-1] + seq_len > length:
        raise ValueError(f"{what}: the window at offset {ordered[-1]} ({seq_len} tokens) runs past the end of the "
                         f"data ({length} tokens); use offsets <= {max(length - seq_len, 0)} or give more data.")
