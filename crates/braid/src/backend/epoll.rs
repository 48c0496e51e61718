//! epoll(7) backend. (being written)
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use super::{Event, Interest, Poller};

pub(crate) struct EpollPoller {}

impl EpollPoller {
    pub fn new() -> io::Result<Self> {
        todo!()
    }
}

impl Poller for EpollPoller {
    fn update(&mut self, _fd: RawFd, _old: Interest, _new: Interest) -> io::Result<()> {
        todo!()
    }
    fn poll(&mut self, _events: &mut Vec<Event>, _timeout: Option<Duration>) -> io::Result<()> {
        todo!()
    }
}
