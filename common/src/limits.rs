//! Hard limits shared by agent and aggregator. Config keys may lower these, never raise them.
//! Each one bounds memory a peer can make us allocate before we have checked anything else.

/// Largest single event, encoded. Big enough for a fat Segment/Snowplow event with contexts;
/// a larger one is almost certainly a misuse (a file upload, a log dump) and is refused.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// Most events in one batch. Bounds per-batch work on the aggregator's single writer thread.
pub const MAX_BATCH_EVENTS: usize = 10_000;

/// Largest batch before compression. The aggregator decompresses into a buffer of at most this
/// size, so a zstd bomb cannot make it allocate more.
pub const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;

/// Largest frame on any stream. A compressed batch can be slightly larger than its input when
/// the data does not compress, hence the headroom.
pub const MAX_FRAME_BYTES: usize = MAX_BATCH_BYTES + 64 * 1024;

/// Largest control-stream frame (hello, welcome, heartbeat). Control messages are small; a large
/// one is hostile.
pub const MAX_CONTROL_FRAME_BYTES: usize = 1024 * 1024;

/// Most labels an agent may announce, and the longest label key or value.
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_BYTES: usize = 63;

/// Most batches an aggregator parks per connection while waiting for an earlier one in the chain.
pub const MAX_PARKED_BATCHES: usize = 1024;

const _: () = assert!(MAX_EVENT_BYTES < MAX_BATCH_BYTES);
const _: () = assert!(MAX_BATCH_BYTES < MAX_FRAME_BYTES);
const _: () = assert!(MAX_CONTROL_FRAME_BYTES <= MAX_FRAME_BYTES);
const _: () = assert!(MAX_FRAME_BYTES <= u32::MAX as usize);
