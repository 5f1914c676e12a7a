//! `memtrace top` (being written).
use crate::client::Client;

pub fn run(_client: Client, _interval: f64) -> Result<(), String> {
    Err("memtrace top is not built yet".into())
}
