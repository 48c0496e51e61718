//! `Deferred` as a `Future`, so sequential logic can `.await` it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::Deferred;
use crate::error::Failure;

/// Awaiting a Deferred waits until it has fired and its chain has finished
/// (not paused, not waiting on another Deferred), then takes the result:
/// afterwards the Deferred holds none, so a failure that was awaited is not
/// reported as unhandled. Awaiting again, or awaiting a Deferred whose result
/// has already moved elsewhere, gives a
/// [`DeferError::ResultConsumed`](super::DeferError::ResultConsumed) failure.
///
/// Polling registers the task's waker; firing the Deferred (or unpausing
/// it) wakes it. No executor is needed beyond one that polls on wake-up.
impl<T: 'static> Future for Deferred<T> {
    type Output = Result<T, Failure>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.poll_take(cx.waker()) {
            Some(result) => Poll::Ready(result),
            None => Poll::Pending,
        }
    }
}
