//! Benchmark peers and load generators for braid. Not part of the library.
