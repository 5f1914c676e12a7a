//! One module per hook family.
mod alloc;
mod ends;
mod faults;
mod http;
mod mmap;
mod python;
mod request;
mod rss;
mod sched;
mod socket;
mod stacks;
