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

/// Largest file (an ONNX model) travelling with a config push. Edge models (gradient-boosted
/// trees, small MLPs) are kilobytes to a few MiB; a larger one does not belong on every agent.
pub const MAX_CONFIG_FILE_BYTES: usize = 8 * 1024 * 1024;

/// Most bytes of one config push: the document plus all its files.
pub const MAX_CONFIG_PUSH_BYTES: usize = 16 * 1024 * 1024;

/// Most files in one config push.
pub const MAX_CONFIG_FILES: usize = 64;

/// Largest control-stream frame (hello, welcome, status, config push and result). Status messages
/// are small; a config push carries its models, hence the room for [`MAX_CONFIG_PUSH_BYTES`]
/// plus the names and hashes around them. Peers are authenticated (mTLS) before any control frame
/// is read, and each connection reads one control frame at a time.
pub const MAX_CONTROL_FRAME_BYTES: usize = MAX_CONFIG_PUSH_BYTES + 64 * 1024;

/// Most labels an agent may announce, and the longest label key or value.
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_BYTES: usize = 63;

/// Most batches an aggregator parks per connection while waiting for an earlier one in the chain.
pub const MAX_PARKED_BATCHES: usize = 1024;

const _: () = assert!(MAX_EVENT_BYTES < MAX_BATCH_BYTES);
const _: () = assert!(MAX_BATCH_BYTES < MAX_FRAME_BYTES);
const _: () = assert!(MAX_CONTROL_FRAME_BYTES <= MAX_FRAME_BYTES);
const _: () = assert!(MAX_CONFIG_FILE_BYTES <= MAX_CONFIG_PUSH_BYTES);
const _: () = assert!(MAX_CONFIG_PUSH_BYTES < MAX_CONTROL_FRAME_BYTES);
const _: () = assert!(MAX_FRAME_BYTES <= u32::MAX as usize);
