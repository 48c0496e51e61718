//! The FD set: which user descriptors the reactor watches, and for what.
//!
//! Any type that can name its file descriptor and react to readiness can be
//! watched (Twisted's `IReadDescriptor`/`IWriteDescriptor`). The table is a
//! vector indexed by fd number: descriptors are small dense integers, so a
//! lookup per event is one bounds check and one load.

use std::os::fd::RawFd;
use std::rc::Rc;

use crate::backend::Interest;

use crate::error::Failure;

/// Something the reactor can watch: a file descriptor plus what to do when
/// it is ready. Methods take `&self`; keep mutable state in a `Cell` or
/// `RefCell`, since the reactor shares the object with your code.
pub trait FileDescriptor {
    /// The descriptor to watch, or -1 once it is gone (closed). The reactor
    /// drops a descriptor that reports -1 with [`crate::Error::FdWentAway`].
    fn fileno(&self) -> RawFd;

    /// The descriptor may be readable. An `Err` disconnects it with that
    /// reason: use `Error::ConnectionDone` for a clean end of stream.
    fn do_read(&self) -> Result<(), Failure> {
        Ok(())
    }

    /// The descriptor may be writable. An `Err` disconnects it.
    fn do_write(&self) -> Result<(), Failure> {
        Ok(())
    }

    /// The reactor has stopped watching this descriptor for good, because
    /// `do_read`/`do_write` failed, the fd went away, or the reactor shut down.
    fn connection_lost(&self, reason: Failure);

    /// True if the descriptor can outlive a clean end of its read side
    /// (half-close): the reactor then calls [`FileDescriptor::read_connection_lost`]
    /// and keeps watching it for writes instead of disconnecting it.
    fn half_closeable(&self) -> bool {
        false
    }

    /// True if an error or hang-up event should go to `do_read` (which
    /// then reads the pending socket error) instead of disconnecting the
    /// descriptor: a datagram socket, where an error is an ICMP report
    /// about one datagram, not the end of anything.
    fn reads_errors(&self) -> bool {
        false
    }

    /// The read side ended cleanly; only called when `half_closeable()`.
    fn read_connection_lost(&self, _reason: Failure) {}

    /// A short name for log lines about this descriptor.
    fn log_prefix(&self) -> String {
        format!("fd {}", self.fileno())
    }
}

/// Anything the FD-set calls accept: an `Rc` of a descriptor type, or an
/// already type-erased `Rc<dyn FileDescriptor>`.
pub trait IntoDescriptor {
    /// Erases the concrete type.
    fn into_descriptor(self) -> Rc<dyn FileDescriptor>;
}

impl<T: FileDescriptor + 'static> IntoDescriptor for Rc<T> {
    fn into_descriptor(self) -> Rc<dyn FileDescriptor> {
        self
    }
}

impl IntoDescriptor for Rc<dyn FileDescriptor> {
    fn into_descriptor(self) -> Rc<dyn FileDescriptor> {
        self
    }
}

/// The address of the object behind an `Rc`, for identity comparisons.
pub(crate) fn identity<T: ?Sized>(rc: &Rc<T>) -> *const () {
    Rc::as_ptr(rc) as *const ()
}

#[derive(Default, Clone)]
pub(crate) struct Slot {
    pub reader: Option<Rc<dyn FileDescriptor>>,
    pub writer: Option<Rc<dyn FileDescriptor>>,
}

impl Slot {
    pub fn interest(&self) -> Interest {
        Interest { read: self.reader.is_some(), write: self.writer.is_some() }
    }

    fn role(&mut self, read: bool) -> &mut Option<Rc<dyn FileDescriptor>> {
        if read {
            &mut self.reader
        } else {
            &mut self.writer
        }
    }
}

/// Per-fd watch state: a vector indexed by fd number.
///
/// Removing a descriptor is O(1) when it is looked up at the fd it was
/// registered with: its `fileno()`, or for the reactor's own transports the
/// fd they remember (they are removed after their socket is marked closed).
/// Only a user's descriptor that reports a different fd (or -1, having
/// closed its fd first) is searched for, as Twisted's reactors do.
#[derive(Default)]
pub(crate) struct FdTable {
    slots: Vec<Slot>,
}

impl FdTable {
    pub fn get(&self, fd: RawFd) -> Option<&Slot> {
        usize::try_from(fd).ok().and_then(|i| self.slots.get(i))
    }

    /// True if `ptr` is the reader (`read`) or writer of `fd`.
    pub fn holds(&self, fd: RawFd, ptr: *const (), read: bool) -> bool {
        self.get(fd).is_some_and(|s| {
            let d = if read { &s.reader } else { &s.writer };
            d.as_ref().is_some_and(|d| identity(d) == ptr)
        })
    }

    /// Finds the fd where `ptr` is registered as reader (`read`) or writer:
    /// O(open fds), for descriptors whose fd changed or went away.
    pub fn find(&self, ptr: *const (), read: bool) -> Option<RawFd> {
        (0..self.slots.len()).map(|i| i as RawFd).find(|&fd| self.holds(fd, ptr, read))
    }

    pub fn interest(&self, fd: RawFd) -> Interest {
        self.get(fd).map_or(Interest::NONE, Slot::interest)
    }

    /// Makes `d` the reader (`read`) or writer of `fd` (`fd` >= 0),
    /// displacing whatever held that role.
    pub fn insert(&mut self, fd: RawFd, d: Rc<dyn FileDescriptor>, read: bool) {
        let i = fd as usize;
        if i >= self.slots.len() {
            self.slots.resize_with(i + 1, Slot::default);
        }
        *self.slots[i].role(read) = Some(d);
    }

    /// Removes `ptr` from the roles asked for at `fd`; returns the fd's
    /// interest before and after.
    pub fn remove(&mut self, fd: RawFd, ptr: *const (), read: bool, write: bool) -> (Interest, Interest) {
        let Some(slot) = usize::try_from(fd).ok().and_then(|i| self.slots.get_mut(i)) else {
            return (Interest::NONE, Interest::NONE);
        };
        let before = slot.interest();
        for role in [true, false] {
            let asked = if role { read } else { write };
            let here = slot.role(role);
            if asked && here.as_ref().is_some_and(|d| identity(d) == ptr) {
                *here = None;
            }
        }
        (before, slot.interest())
    }

    /// Empties the table; returns every watched fd with its slot.
    pub fn take_all(&mut self) -> Vec<(RawFd, Slot)> {
        let mut taken = Vec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if slot.reader.is_some() || slot.writer.is_some() {
                taken.push((i as RawFd, std::mem::take(slot)));
            }
        }
        taken
    }

    pub fn readers(&self) -> Vec<Rc<dyn FileDescriptor>> {
        self.slots.iter().filter_map(|s| s.reader.clone()).collect()
    }

    pub fn writers(&self) -> Vec<Rc<dyn FileDescriptor>> {
        self.slots.iter().filter_map(|s| s.writer.clone()).collect()
    }
}

/// Each descriptor in `slots` once (one may be both reader and writer).
pub(crate) fn unique(slots: Vec<(RawFd, Slot)>) -> Vec<Rc<dyn FileDescriptor>> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (_, slot) in slots {
        for d in [slot.reader, slot.writer].into_iter().flatten() {
            if seen.insert(identity(&d)) {
                out.push(d);
            }
        }
    }
    out
}

/// The descriptors of `more` that are not in `already` (by identity).
pub(crate) fn unique_besides(
    already: &[Rc<dyn FileDescriptor>],
    more: Vec<Rc<dyn FileDescriptor>>,
) -> Vec<Rc<dyn FileDescriptor>> {
    let seen: std::collections::HashSet<_> = already.iter().map(identity).collect();
    more.into_iter().filter(|d| !seen.contains(&identity(d))).collect()
}
