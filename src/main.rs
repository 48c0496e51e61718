//! The `braid` command. (being written)
fn main() {}
