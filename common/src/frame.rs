//! Length-prefixed framing: `u32` little-endian payload length, then a postcard payload.
//!
//! The length is checked against the caller's limit before anything is allocated, so a peer
//! cannot make us reserve memory by announcing a large frame.

use serde::{Serialize, de::DeserializeOwned};

/// Bytes in the length prefix.
pub const LENGTH_PREFIX_BYTES: usize = 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {n_bytes} bytes exceeds the limit of {max_bytes} bytes")]
    TooLarge { n_bytes: usize, max_bytes: usize },
    #[error("frame does not decode: {0}")]
    Decode(String),
    #[error("message does not encode: {0}")]
    Encode(String),
    #[error("{n_trailing} unexpected bytes after the frame")]
    Trailing { n_trailing: usize },
}

/// Encodes `message` as one frame. Fails if the encoding exceeds `max_bytes`.
pub fn encode<T: Serialize>(message: &T, max_bytes: usize) -> Result<Vec<u8>, FrameError> {
    let mut out = postcard::to_extend(message, vec![0u8; LENGTH_PREFIX_BYTES])
        .map_err(|error| FrameError::Encode(error.to_string()))?;
    let n_payload = out.len() - LENGTH_PREFIX_BYTES;
    if n_payload > max_bytes {
        return Err(FrameError::TooLarge {
            n_bytes: n_payload,
            max_bytes,
        });
    }
    let prefix = u32::try_from(n_payload).map_err(|_| FrameError::TooLarge {
        n_bytes: n_payload,
        max_bytes,
    })?;
    out[..LENGTH_PREFIX_BYTES].copy_from_slice(&prefix.to_le_bytes());
    Ok(out)
}

/// Reads the payload length from a prefix and checks it against `max_bytes`. Call this before
/// allocating the payload buffer.
pub fn payload_len(
    prefix: [u8; LENGTH_PREFIX_BYTES],
    max_bytes: usize,
) -> Result<usize, FrameError> {
    let n_bytes = u32::from_le_bytes(prefix) as usize;
    if n_bytes > max_bytes {
        return Err(FrameError::TooLarge { n_bytes, max_bytes });
    }
    Ok(n_bytes)
}

/// Decodes a frame payload (without its prefix). Trailing bytes are an error: a frame holds
/// exactly one message.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let (message, rest) = postcard::take_from_bytes::<T>(payload)
        .map_err(|error| FrameError::Decode(error.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Trailing {
            n_trailing: rest.len(),
        });
    }
    Ok(message)
}

/// Decodes one complete frame (prefix and payload) from `bytes`, which must hold exactly one
/// frame. Used by tests and fuzzing; drivers read the prefix and payload separately.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], max_bytes: usize) -> Result<T, FrameError> {
    let Some((prefix, payload)) = bytes.split_first_chunk::<LENGTH_PREFIX_BYTES>() else {
        return Err(FrameError::Decode(format!(
            "{} bytes is shorter than the length prefix",
            bytes.len()
        )));
    };
    let n_payload = payload_len(*prefix, max_bytes)?;
    if payload.len() < n_payload {
        return Err(FrameError::Decode(format!(
            "frame announces {n_payload} bytes, {} present",
            payload.len()
        )));
    }
    if payload.len() > n_payload {
        return Err(FrameError::Trailing {
            n_trailing: payload.len() - n_payload,
        });
    }
    decode_payload(payload)
}
