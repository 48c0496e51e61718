//! select(2) backend. (being written)
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use super::{Event, Interest, Poller};

pub(crate) const FD_SETSIZE: usize = libc::FD_SETSIZE;

pub(crate) struct SelectPoller {}

impl SelectPoller {
    pub fn new() -> io::Result<Self> {
        todo!()
    }
}

impl Poller for SelectPoller {
    fn update(&mut self, _fd: RawFd, _old: Interest, _new: Interest) -> io::Result<()> {
        todo!()
    }
    fn poll(&mut self, _events: &mut Vec<Event>, _timeout: Option<Duration>) -> io::Result<()> {
        todo!()
    }
}
