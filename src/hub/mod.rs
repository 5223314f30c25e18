//! Shipping the store to a ClickHouse hub (docs/HUB.md): [`batch`] reads
//! an id range of `logs`, or a range of recorded changes of `sessions` and
//! `export_archive`, and serialises it deterministically for the hub's
//! `JSONEachRow` insert; [`sync`] is the thread that ships batches exactly
//! once (a watermark per target and the record of the batch in flight);
//! [`transport`] POSTs a batch to ClickHouse or a generic NDJSON receiver,
//! over HTTP or HTTPS.

pub mod batch;
pub mod sync;
pub mod transport;
