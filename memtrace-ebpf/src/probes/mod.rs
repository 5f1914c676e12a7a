//! One module per hook family.
mod faults;
mod mmap;
mod request;
mod rss;
mod sched;
mod stacks;
