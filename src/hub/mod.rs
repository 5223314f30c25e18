//! Shipping the store to a ClickHouse hub (docs/HUB.md): [`batch`] reads
//! an id range of `logs` and serialises it deterministically for the hub's
//! `JSONEachRow` insert; [`sync`] is the thread that ships batches exactly
//! once (a watermark and the record of the batch in flight); [`transport`]
//! POSTs a batch to ClickHouse or a generic NDJSON receiver, over HTTP or
//! HTTPS. Logs only so far: sessions and export records are not shipped
//! yet.

pub mod batch;
pub mod sync;
pub mod transport;
