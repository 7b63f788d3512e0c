//! Decoders: bytes from a source -> [`runnel_common::Event`]s. Pure functions: no I/O, no clock
//! (the receive time is an argument), so they are unit-tested and fuzzed directly.

pub mod json;
