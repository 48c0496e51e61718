//! Operating-system plumbing the reactor needs besides polling: the wake-up
//! descriptor, process signal handlers, a cache prefetch hint, the time-stamp counter, mapped vectors. Like `backend/`, this is a place
//! where `unsafe` may live.

pub(crate) mod big_vec;
pub(crate) mod listen_fds;
pub(crate) mod mmsg;
pub(crate) mod prefetch;
pub(crate) mod signal;
pub(crate) mod spawn;
pub(crate) mod tsc;
pub(crate) mod unix_socket;
pub(crate) mod waker;
