//! The only module that names atomics, locks, `Arc` or cells. Under
//! `cfg(loom)` it re-exports loom's versions so the model checker sees every
//! synchronising operation of the crate; elsewhere it re-exports `std`'s.
//!
//! `OnceBox` is the one place in the crate with `unsafe`: a pointer published
//! once with Release and read with Acquire, freed only by `Drop` (which has
//! `&mut self`, so no reader can exist then).

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering};
#[cfg(loom)]
pub use loom::sync::Arc;
#[cfg(loom)]
pub(crate) use loom::sync::{Mutex, MutexGuard};
#[cfg(loom)]
pub(crate) use loom::thread::yield_now as spin_wait;

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
pub use std::sync::Arc;
#[cfg(not(loom))]
pub(crate) use std::sync::{Mutex, MutexGuard};

/// Back-off inside a retry loop. Outside loom a CPU hint; under loom a
/// yield, which loom requires of every spin loop to bound its exploration.
#[cfg(not(loom))]
#[inline]
pub(crate) fn spin_wait() {
    std::hint::spin_loop();
}

/// Lock a mutex, treating poisoning as recoverable: every critical section of
/// the crate leaves its data consistent before any point that could panic.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    #[cfg(loom)]
    {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }
    #[cfg(not(loom))]
    {
        m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Pads and aligns a value to 128 bytes (two cache lines, the prefetch pair
/// on x86) so that hot counters touched by different threads do not share a
/// line.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct CachePadded<T>(pub T);

impl<T> std::ops::Deref for CachePadded<T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        &self.0
    }
}

// The one allowance of `unsafe` in the crate (`lib.rs` denies it elsewhere).
#[allow(unsafe_code)]
mod once_box {
    use super::{AtomicPtr, Ordering};

    /// A slot that is written at most once (under an outside lock) and read
    /// lock-free afterwards. Values are never moved or freed while `&self` lives.
    pub(crate) struct OnceBox<T> {
        ptr: AtomicPtr<T>,
        // Owns a `T`: makes `OnceBox<T>` Send/Sync exactly when `Box<T>` is,
        // rather than always (as a bare `AtomicPtr` would be).
        _owns: std::marker::PhantomData<Box<T>>,
    }

    impl<T> OnceBox<T> {
        pub(crate) fn new() -> Self {
            Self {
                ptr: AtomicPtr::new(std::ptr::null_mut()),
                _owns: std::marker::PhantomData,
            }
        }

        /// The value, if it was set.
        #[inline]
        pub(crate) fn get(&self) -> Option<&T> {
            // Acquire: pairs with the Release store in `set`, so the pointee's
            // initialisation happens-before our reads of it.
            let p = self.ptr.load(Ordering::Acquire);
            // SAFETY: `p` is null or came from `Box::into_raw` in `set`; it is
            // freed only in `drop`, which needs `&mut self`, so it outlives `&self`.
            unsafe { p.as_ref() }
        }

        /// Set the value. Callers serialise `set` through an outside lock; a
        /// second `set` of the same slot is refused and returns the value back.
        pub(crate) fn set(&self, value: Box<T>) -> Result<&T, Box<T>> {
            if !self.ptr.load(Ordering::Acquire).is_null() {
                return Err(value);
            }
            let raw = Box::into_raw(value);
            // Release: pairs with the Acquire load in `get`.
            self.ptr.store(raw, Ordering::Release);
            // SAFETY: `raw` came from `Box::into_raw` just above and lives until `drop`.
            Ok(unsafe { &*raw })
        }
    }

    impl<T> Drop for OnceBox<T> {
        fn drop(&mut self) {
            #[cfg(loom)]
            let p = self.ptr.with_mut(|p| *p);
            #[cfg(not(loom))]
            let p = *self.ptr.get_mut();
            if !p.is_null() {
                // SAFETY: `p` came from `Box::into_raw` in `set`, was never freed,
                // and `&mut self` proves no reader holds a reference into it.
                drop(unsafe { Box::from_raw(p) });
            }
        }
    }
}

pub(crate) use once_box::OnceBox;
