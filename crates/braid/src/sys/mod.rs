//! Operating-system plumbing (wakers, signals).
