//! Entry points for fuzzing: the `cargo fuzz` targets in `fuzz/` and the corpus replay test
//! (`common/tests/corpus.rs`, run by CI without a nightly toolchain) call the same functions.
//! Each takes arbitrary bytes; decoding may fail, but must never panic or allocate without bound.

use crate::limits::MAX_FRAME_BYTES;
use crate::wire::{AckMessage, AgentMessage, AggregatorMessage, BatchMessage};
use crate::{batch, frame};

/// Every frame type either side decodes from the network, and a decoded batch's events.
pub fn frames(data: &[u8]) {
    let _ = frame::decode::<AgentMessage>(data, MAX_FRAME_BYTES);
    let _ = frame::decode::<AggregatorMessage>(data, MAX_FRAME_BYTES);
    let _ = frame::decode::<AckMessage>(data, MAX_FRAME_BYTES);
    if let Ok(BatchMessage::Batch(batch)) = frame::decode::<BatchMessage>(data, MAX_FRAME_BYTES) {
        let _ = batch::decode(&batch);
    }
}
