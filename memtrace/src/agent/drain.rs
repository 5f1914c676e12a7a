//! Draining the ring buffer into the state: on the event loop's timer and
//! the kernel's wake-ups, and before anyone reads the state (an API call, a
//! test), so what they read includes every event the kernel has submitted
//! and not only those of the last timer tick.
use std::{
    os::fd::{AsFd as _, OwnedFd},
    sync::{Arc, Mutex, MutexGuard},
};

use aya::maps::{MapData, RingBuf};

use super::state::{SharedState, State, lock};
use crate::{kernel::events::decode, model::requests::WallClock};

/// The ring buffer and the state its events go into. Clones share both.
/// Lock order: the ring, then the state; never drain holding the state.
#[derive(Clone)]
pub struct EventDrain {
    ring: Arc<Mutex<RingBuf<MapData>>>,
    state: SharedState,
}

impl EventDrain {
    pub fn new(ring: RingBuf<MapData>, state: SharedState) -> Self {
        Self {
            ring: Arc::new(Mutex::new(ring)),
            state,
        }
    }

    /// Handles every event in the ring; returns how many. Each is handled
    /// as it is read, under one state lock and one clock reading for the
    /// batch: no copy, allocation or clock read per event.
    pub fn drain(&self) -> usize {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let Some(first) = ring.next() else {
            return 0;
        };
        let mut state = lock(&self.state);
        let clock = WallClock::now();
        let (mut n, mut errors) = (0u64, 0u64);
        let mut handle = |item: &[u8], state: &mut State| match decode(item) {
            Ok(ev) => {
                n += 1;
                state.handle(ev, &clock);
            }
            Err(_) => errors += 1,
        };
        handle(&first, &mut state);
        drop(first);
        while let Some(item) = ring.next() {
            handle(&item, &mut state);
        }
        state.counters.events_received += n;
        state.counters.decode_errors += errors;
        n as usize
    }

    pub fn state(&self) -> SharedState {
        self.state.clone()
    }

    /// The state, locked, after a drain: what a reader gets includes every
    /// event the kernel has submitted so far.
    pub fn current(&self) -> MutexGuard<'_, State> {
        self.drain();
        lock(&self.state)
    }

    /// A descriptor of the ring, to wait on its wake-ups.
    pub fn ring_fd(&self) -> std::io::Result<OwnedFd> {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.as_fd().try_clone_to_owned()
    }
}
