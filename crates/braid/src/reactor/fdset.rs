//! The FD set: which user descriptors the reactor watches, and for what.
//!
//! Any type that can name its file descriptor and react to readiness can be
//! watched (Twisted's `IReadDescriptor`/`IWriteDescriptor`). The table is a
//! vector indexed by fd number: descriptors are small dense integers, so a
//! lookup per event is one bounds check and one load.

use std::os::fd::RawFd;
use std::rc::Rc;

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
    pub fn interest(&self) -> crate::backend::Interest {
        crate::backend::Interest { read: self.reader.is_some(), write: self.writer.is_some() }
    }
}

/// Per-fd watch state.
#[derive(Default)]
pub(crate) struct FdTable {
    slots: Vec<Slot>,
}

impl FdTable {
    pub fn get(&self, fd: RawFd) -> Option<&Slot> {
        usize::try_from(fd).ok().and_then(|i| self.slots.get(i))
    }

    pub fn slot_mut(&mut self, fd: RawFd) -> &mut Slot {
        let i = fd as usize;
        if i >= self.slots.len() {
            self.slots.resize_with(i + 1, Slot::default);
        }
        &mut self.slots[i]
    }

    /// Replaces the slot for `fd`.
    pub fn set(&mut self, fd: RawFd, slot: Slot) {
        *self.slot_mut(fd) = slot;
    }

    /// Finds the fd where `ptr` is registered as reader (`read`) or writer.
    pub fn find(&self, ptr: *const (), read: bool) -> Option<RawFd> {
        self.slots
            .iter()
            .position(|s| {
                let d = if read { &s.reader } else { &s.writer };
                d.as_ref().is_some_and(|d| identity(d) == ptr)
            })
            .map(|i| i as RawFd)
    }

    pub fn readers(&self) -> Vec<Rc<dyn FileDescriptor>> {
        self.slots.iter().filter_map(|s| s.reader.clone()).collect()
    }

    pub fn writers(&self) -> Vec<Rc<dyn FileDescriptor>> {
        self.slots.iter().filter_map(|s| s.writer.clone()).collect()
    }

    /// fds that have any watcher.
    pub fn active_fds(&self) -> Vec<RawFd> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.reader.is_some() || s.writer.is_some())
            .map(|(i, _)| i as RawFd)
            .collect()
    }
}
