//! Operating-system plumbing the reactor needs besides polling: the wake-up
//! descriptor and process signal handlers. Like `backend/`, this is a place
//! where `unsafe` may live.

pub(crate) mod signal;
pub(crate) mod waker;
