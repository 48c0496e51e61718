//! Byte streams: the one connection implementation every stream kind
//! (TCP today; UNIX sockets, pipes and adopted sockets next) shares, over a
//! small trait that says what each kind does differently.

pub(crate) mod connection;
pub(crate) mod kind;
