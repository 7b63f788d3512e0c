//! The batch codec: events -> postcard -> zstd -> [`Batch`], and back with every check a hostile
//! peer needs: sizes before allocation, decompression bounded, sequence numbers in order and
//! inside the range the header claims.

use crate::columnar::Layout;
use crate::event::Event;
use crate::limits::{MAX_BATCH_BYTES, MAX_BATCH_EVENTS};
use crate::wire::{Batch, Compression};

/// zstd level for batches. Level 3 is zstd's default: most of the ratio at a small CPU cost on
/// edge hosts; the ratio is recorded in docs/BENCHMARKS.md.
pub const ZSTD_LEVEL: i32 = 3;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
    #[error("batch is empty")]
    Empty,
    #[error("batch holds {n_events} events, more than the limit of {max_events}")]
    TooManyEvents { n_events: usize, max_events: usize },
    #[error("batch is {n_bytes} bytes uncompressed, more than the limit of {max_bytes}")]
    TooLarge { n_bytes: usize, max_bytes: usize },
    #[error("batch payload does not decompress: {0}")]
    Decompress(String),
    #[error("batch payload does not decode: {0}")]
    Decode(String),
    #[error("batch header says {header} but the payload has {actual}")]
    HeaderMismatch { header: String, actual: String },
    #[error(
        "sequence numbers must increase strictly after {after_seq}: event {event_idx} has {seq}"
    )]
    OutOfOrder {
        after_seq: u64,
        event_idx: usize,
        seq: u64,
    },
    #[error("batch does not encode: {0}")]
    Encode(String),
    #[error("batch compression failed: {0}")]
    Compress(String),
}

/// Builds a batch from events that already carry their sequence numbers.
/// `after_seq` is the last sequence number of the previous batch in the chain.
pub fn encode(after_seq: u64, events: &[Event]) -> Result<Batch, BatchError> {
    let last = events.last().ok_or(BatchError::Empty)?;
    if events.len() > MAX_BATCH_EVENTS {
        return Err(BatchError::TooManyEvents {
            n_events: events.len(),
            max_events: MAX_BATCH_EVENTS,
        });
    }
    check_order(after_seq, events)?;
    let raw = postcard::to_stdvec(events).map_err(|error| BatchError::Encode(error.to_string()))?;
    compress(after_seq, last.seq, events.len(), &raw)
}

/// Builds a column-wise batch in `layout` ([`Compression::ZstdColumns`] or
/// [`Compression::ZstdColumns2`], see [`crate::columnar`]) from events that already carry their
/// sequence numbers. Several times smaller than [`encode`] on clickstream-like events; only for
/// peers on protocol 2 ([`Layout::V1`]) or 3 ([`Layout::V2`]) and later.
pub fn encode_columns(
    layout: Layout,
    after_seq: u64,
    events: &[Event],
) -> Result<Batch, BatchError> {
    let last = events.last().ok_or(BatchError::Empty)?;
    if events.len() > MAX_BATCH_EVENTS {
        return Err(BatchError::TooManyEvents {
            n_events: events.len(),
            max_events: MAX_BATCH_EVENTS,
        });
    }
    check_order(after_seq, events)?;
    let encoded = crate::columnar::encode(layout, after_seq, events)
        .map_err(|error| BatchError::Encode(error.to_string()))?;
    // Two zstd frames when there is a side section (they decompress as one): its random bytes
    // would otherwise share, and widen, the literal codes of the columns.
    let (columns, side) = encoded.bytes.split_at(encoded.side_at);
    let mut batch = compress(after_seq, last.seq, events.len(), columns)?;
    if !side.is_empty() {
        batch.payload.extend(zstd_compress(side)?);
        batch.uncompressed_bytes = u32::try_from(encoded.bytes.len())
            .ok()
            .filter(|&n| n as usize <= MAX_BATCH_BYTES)
            .ok_or(BatchError::TooLarge {
                n_bytes: encoded.bytes.len(),
                max_bytes: MAX_BATCH_BYTES,
            })?;
    }
    batch.compression = match layout {
        Layout::V1 => Compression::ZstdColumns,
        Layout::V2 => Compression::ZstdColumns2,
    };
    Ok(batch)
}

/// Builds a batch from `raw`, the postcard encoding of `n_events` events (a `Vec<Event>`) whose
/// sequence numbers are above `after_seq` and end at `last_seq`. For senders that keep events
/// encoded (the agent's buffer) and would otherwise decode them only to encode them again. The
/// receiver checks everything [`decode`] checks, so a wrong `raw` is refused there, not stored.
pub fn compress(
    after_seq: u64,
    last_seq: u64,
    n_events: usize,
    raw: &[u8],
) -> Result<Batch, BatchError> {
    if n_events == 0 {
        return Err(BatchError::Empty);
    }
    if n_events > MAX_BATCH_EVENTS {
        return Err(BatchError::TooManyEvents {
            n_events,
            max_events: MAX_BATCH_EVENTS,
        });
    }
    if raw.len() > MAX_BATCH_BYTES {
        return Err(BatchError::TooLarge {
            n_bytes: raw.len(),
            max_bytes: MAX_BATCH_BYTES,
        });
    }
    if last_seq <= after_seq {
        return Err(BatchError::OutOfOrder {
            after_seq,
            event_idx: n_events - 1,
            seq: last_seq,
        });
    }
    let payload = zstd_compress(raw)?;
    Ok(Batch {
        after_seq,
        last_seq,
        n_events: u32::try_from(n_events).expect("bounded by MAX_BATCH_EVENTS"),
        uncompressed_bytes: u32::try_from(raw.len()).expect("bounded by MAX_BATCH_BYTES"),
        compression: Compression::Zstd,
        payload,
    })
}

fn zstd_compress(raw: &[u8]) -> Result<Vec<u8>, BatchError> {
    zstd::bulk::compress(raw, ZSTD_LEVEL).map_err(|error| BatchError::Compress(error.to_string()))
}

/// Decodes and checks a batch received from a peer. Never panics, never allocates more than
/// [`MAX_BATCH_BYTES`] for the payload.
pub fn decode(batch: &Batch) -> Result<Vec<Event>, BatchError> {
    let n_events = batch.n_events as usize;
    if n_events == 0 {
        return Err(BatchError::Empty);
    }
    if n_events > MAX_BATCH_EVENTS {
        return Err(BatchError::TooManyEvents {
            n_events,
            max_events: MAX_BATCH_EVENTS,
        });
    }
    let n_bytes = batch.uncompressed_bytes as usize;
    if n_bytes > MAX_BATCH_BYTES {
        return Err(BatchError::TooLarge {
            n_bytes,
            max_bytes: MAX_BATCH_BYTES,
        });
    }
    let raw = match batch.compression {
        Compression::None => std::borrow::Cow::Borrowed(batch.payload.as_slice()),
        // `bulk::decompress` refuses to produce more than `n_bytes`, so a bomb fails here.
        Compression::Zstd | Compression::ZstdColumns | Compression::ZstdColumns2 => {
            std::borrow::Cow::Owned(
                zstd::bulk::decompress(&batch.payload, n_bytes)
                    .map_err(|error| BatchError::Decompress(error.to_string()))?,
            )
        }
    };
    if raw.len() != n_bytes {
        return Err(BatchError::HeaderMismatch {
            header: format!("{n_bytes} uncompressed bytes"),
            actual: format!("{} bytes", raw.len()),
        });
    }
    if let Some(layout) = batch.compression.columns_layout() {
        let events = crate::columnar::decode(layout, &raw, batch.after_seq, n_events)
            .map_err(|error| BatchError::Decode(error.to_string()))?;
        return check_decoded(batch, events);
    }
    // Check the count the payload announces before decoding any event: decoded events are
    // larger than their encoding, so a payload announcing more events than the header could
    // make us allocate far more than MAX_BATCH_BYTES.
    let (n_announced, _) = postcard::take_from_bytes::<u64>(&raw)
        .map_err(|error| BatchError::Decode(error.to_string()))?;
    if n_announced != n_events as u64 {
        return Err(BatchError::HeaderMismatch {
            header: format!("{n_events} events"),
            actual: format!("{n_announced} events"),
        });
    }
    let (events, rest) = postcard::take_from_bytes::<Vec<Event>>(&raw)
        .map_err(|error| BatchError::Decode(error.to_string()))?;
    if !rest.is_empty() {
        return Err(BatchError::Decode(format!(
            "{} unexpected bytes after the events",
            rest.len()
        )));
    }
    debug_assert_eq!(events.len(), n_events);
    check_decoded(batch, events)
}

/// The checks every decoded batch passes: order and the header's last sequence number.
fn check_decoded(batch: &Batch, events: Vec<Event>) -> Result<Vec<Event>, BatchError> {
    check_order(batch.after_seq, &events)?;
    let last_seq = events.last().map_or(0, |e| e.seq);
    if last_seq != batch.last_seq {
        return Err(BatchError::HeaderMismatch {
            header: format!("last_seq {}", batch.last_seq),
            actual: format!("last event seq {last_seq}"),
        });
    }
    Ok(events)
}

fn check_order(after_seq: u64, events: &[Event]) -> Result<(), BatchError> {
    let mut previous = after_seq;
    for (event_idx, event) in events.iter().enumerate() {
        if event.seq <= previous {
            return Err(BatchError::OutOfOrder {
                after_seq: previous,
                event_idx,
                seq: event.seq,
            });
        }
        previous = event.seq;
    }
    Ok(())
}
