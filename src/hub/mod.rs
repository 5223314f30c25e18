//! Shipping the store to a ClickHouse hub (docs/HUB.md). Built so far:
//! [`batch`], which reads an id range of `logs` and serialises it
//! deterministically for the hub's `JSONEachRow` insert. The sync thread
//! that will send batches (its watermark, the record of the batch in
//! flight, retries) is not built yet; nothing calls this module.

pub mod batch;
