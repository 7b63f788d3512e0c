//! The column-wise batch layout ([`Compression::ZstdColumns`](crate::wire::Compression)): the
//! events of a batch transposed into one column per field before zstd, so that what repeats
//! across events sits side by side. Row-wise postcard interleaves a UUID, a timestamp, a URL and
//! a user agent per event, which leaves zstd little to find; column-wise, timestamps become small
//! deltas, low-cardinality strings (stream, name, user and session ids, attribute values) become
//! dictionary indexes, UUIDs and hex ids travel as their 16 or 8 raw bytes instead of 36 or 16
//! characters, and each attribute key is written once per batch.
//!
//! The layout is a postcard-encoded [`Columns`]; every transformation is exact, so decoding gives
//! back the very events that were encoded (property-tested in `tests/columnar.rs`). Decoding is
//! hostile-input safe like the row layout: lengths are checked against the event count before
//! use, indexes against their dictionaries, and the bytes the events would take are counted as
//! they are rebuilt, so a small payload cannot expand past [`MAX_BATCH_BYTES`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::event::{Event, SourceKind, Value};
use crate::limits::MAX_BATCH_BYTES;

/// A batch, column by column. Field order is the wire order: never reorder, only append with a
/// new layout variant.
#[derive(Debug, Serialize, Deserialize)]
struct Columns {
    n_events: u32,
    /// `seq` minus the previous event's (the first: minus the batch's `after_seq`).
    seq_deltas: Vec<u64>,
    /// `event_time_ms` minus the previous event's (the first: as is).
    event_time_deltas: Vec<i64>,
    /// `receive_time_ms` minus the event's own `event_time_ms`.
    receive_lags: Vec<i64>,
    sources: Vec<SourceKind>,
    streams: Dict,
    names: Dict,
    event_ids: Vec<Option<Text>>,
    user_ids: Dict,
    session_ids: Dict,
    scores: Vec<Option<f64>>,
    /// Per event, indexes into `tag_values`.
    tags: Vec<Vec<u32>>,
    tag_values: Vec<String>,
    /// One column per attribute key, in key order.
    attrs: Vec<AttrColumn>,
}

/// Strings by dictionary: `indexes[i]` is 0 for "absent" (only in optional columns) and `k + 1`
/// for `values[k]`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Dict {
    values: Vec<Text>,
    indexes: Vec<u32>,
}

/// A string, in the most compact exact form.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
enum Text {
    Plain(String),
    /// A canonical lowercase UUID (`8-4-4-4-12` hex digits), as its 16 bytes.
    Uuid([u8; 16]),
    /// A string of an even number (at least 8) of lowercase hex digits, as its bytes.
    Hex(Vec<u8>),
}

/// The values of one attribute key: the events that have it and their values.
#[derive(Debug, Serialize, Deserialize)]
struct AttrColumn {
    key: String,
    /// Indexes of the events that have the key, as deltas (the first: from 0), strictly
    /// increasing once summed.
    row_deltas: Vec<u32>,
    values: AttrValues,
}

#[derive(Debug, Serialize, Deserialize)]
enum AttrValues {
    /// Every value is a `Value::String`.
    Strings(Dict),
    /// Every value is a `Value::Int`: deltas from the previous one (the first: as is).
    Ints(Vec<i64>),
    /// Anything else, value by value.
    Values(Vec<Value>),
}

/// Why a column-wise payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ColumnsError(String);

fn error(message: impl Into<String>) -> ColumnsError {
    ColumnsError(message.into())
}

/// Encodes `events` (sequence numbers strictly increasing above `after_seq`; the caller checks)
/// into the uncompressed column-wise payload.
pub fn encode(after_seq: u64, events: &[Event]) -> Result<Vec<u8>, postcard::Error> {
    let n = events.len();
    let mut columns = Columns {
        n_events: u32::try_from(n).unwrap_or(u32::MAX),
        seq_deltas: Vec::with_capacity(n),
        event_time_deltas: Vec::with_capacity(n),
        receive_lags: Vec::with_capacity(n),
        sources: Vec::with_capacity(n),
        streams: Dict::default(),
        names: Dict::default(),
        event_ids: Vec::with_capacity(n),
        user_ids: Dict::default(),
        session_ids: Dict::default(),
        scores: Vec::with_capacity(n),
        tags: Vec::with_capacity(n),
        tag_values: Vec::new(),
        attrs: Vec::new(),
    };
    let mut streams = DictBuilder::default();
    let mut names = DictBuilder::default();
    let mut user_ids = DictBuilder::default();
    let mut session_ids = DictBuilder::default();
    let mut tag_index: BTreeMap<&str, u32> = BTreeMap::new();
    let mut attrs: BTreeMap<&str, Vec<(u32, &Value)>> = BTreeMap::new();
    let (mut previous_seq, mut previous_time) = (after_seq, 0i64);
    for (row, event) in events.iter().enumerate() {
        columns
            .seq_deltas
            .push(event.seq.wrapping_sub(previous_seq));
        previous_seq = event.seq;
        columns
            .event_time_deltas
            .push(event.event_time_ms.wrapping_sub(previous_time));
        previous_time = event.event_time_ms;
        columns
            .receive_lags
            .push(event.receive_time_ms.wrapping_sub(event.event_time_ms));
        columns.sources.push(event.source);
        streams.push(&mut columns.streams, Some(&event.stream));
        names.push(&mut columns.names, Some(&event.name));
        columns
            .event_ids
            .push(event.event_id.as_deref().map(Text::from_str));
        user_ids.push(&mut columns.user_ids, event.user_id.as_deref());
        session_ids.push(&mut columns.session_ids, event.session_id.as_deref());
        columns.scores.push(event.score);
        let tags = event
            .tags
            .iter()
            .map(|tag| {
                let next = tag_index.len() as u32;
                *tag_index.entry(tag.as_str()).or_insert_with(|| {
                    columns.tag_values.push(tag.clone());
                    next
                })
            })
            .collect();
        columns.tags.push(tags);
        let row = u32::try_from(row).unwrap_or(u32::MAX);
        for (key, value) in &event.attrs {
            attrs.entry(key.as_str()).or_default().push((row, value));
        }
    }
    columns.attrs = attrs
        .into_iter()
        .map(|(key, cells)| AttrColumn::build(key, &cells))
        .collect();
    postcard::to_stdvec(&columns)
}

/// Decodes a column-wise payload of `n_events` events above `after_seq`.
pub fn decode(raw: &[u8], after_seq: u64, n_events: usize) -> Result<Vec<Event>, ColumnsError> {
    let (columns, rest) = postcard::take_from_bytes::<Columns>(raw)
        .map_err(|e| error(format!("columns do not decode: {e}")))?;
    if !rest.is_empty() {
        return Err(error(format!(
            "{} unexpected bytes after the columns",
            rest.len()
        )));
    }
    columns.into_events(after_seq, n_events)
}

impl Text {
    fn from_str(text: &str) -> Text {
        if let Some(bytes) = parse_uuid(text) {
            Text::Uuid(bytes)
        } else if let Some(bytes) = parse_hex(text) {
            Text::Hex(bytes)
        } else {
            Text::Plain(text.to_owned())
        }
    }

    fn expand(&self) -> String {
        match self {
            Text::Plain(text) => text.clone(),
            Text::Uuid(bytes) => {
                let hex = to_hex(bytes);
                format!(
                    "{}-{}-{}-{}-{}",
                    &hex[0..8],
                    &hex[8..12],
                    &hex[12..16],
                    &hex[16..20],
                    &hex[20..32]
                )
            }
            Text::Hex(bytes) => to_hex(bytes),
        }
    }

    /// Length of the string this stands for.
    fn len(&self) -> usize {
        match self {
            Text::Plain(text) => text.len(),
            Text::Uuid(_) => 36,
            Text::Hex(bytes) => 2 * bytes.len(),
        }
    }
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

fn parse_hex(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    if bytes.len() < 8 || !bytes.len().is_multiple_of(2) {
        return None;
    }
    bytes
        .chunks_exact(2)
        .map(|pair| Some(hex_digit(pair[0])? << 4 | hex_digit(pair[1])?))
        .collect()
}

fn parse_uuid(text: &str) -> Option<[u8; 16]> {
    let bytes = text.as_bytes();
    if bytes.len() != 36 || [8, 13, 18, 23].iter().any(|&i| bytes[i] != b'-') {
        return None;
    }
    let digits: Vec<u8> = bytes.iter().copied().filter(|&b| b != b'-').collect();
    if digits.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (slot, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *slot = hex_digit(pair[0])? << 4 | hex_digit(pair[1])?;
    }
    Some(out)
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(2 * bytes.len());
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

/// Builds a [`Dict`] in first-seen order.
#[derive(Default)]
struct DictBuilder<'a> {
    index: BTreeMap<&'a str, u32>,
}

impl<'a> DictBuilder<'a> {
    fn push(&mut self, dict: &mut Dict, value: Option<&'a str>) {
        let index = match value {
            None => 0,
            Some(text) => {
                let next = self.index.len() as u32 + 1;
                *self.index.entry(text).or_insert_with(|| {
                    dict.values.push(Text::from_str(text));
                    next
                })
            }
        };
        dict.indexes.push(index);
    }
}

impl AttrColumn {
    fn build(key: &str, cells: &[(u32, &Value)]) -> AttrColumn {
        let mut row_deltas = Vec::with_capacity(cells.len());
        let mut previous = 0u32;
        for (idx, (row, _)) in cells.iter().enumerate() {
            row_deltas.push(if idx == 0 { *row } else { row - previous });
            previous = *row;
        }
        let values = if cells.iter().all(|(_, v)| matches!(v, Value::String(_))) {
            let mut dict = Dict::default();
            let mut builder = DictBuilder::default();
            for (_, value) in cells {
                if let Value::String(text) = value {
                    builder.push(&mut dict, Some(text));
                }
            }
            AttrValues::Strings(dict)
        } else if cells.iter().all(|(_, v)| matches!(v, Value::Int(_))) {
            let mut previous = 0i64;
            AttrValues::Ints(
                cells
                    .iter()
                    .map(|(_, v)| {
                        let Value::Int(n) = v else { unreachable!() };
                        let delta = n.wrapping_sub(previous);
                        previous = *n;
                        delta
                    })
                    .collect(),
            )
        } else {
            AttrValues::Values(cells.iter().map(|(_, v)| (*v).clone()).collect())
        };
        AttrColumn {
            key: key.to_owned(),
            row_deltas,
            values,
        }
    }
}

/// Counts the bytes the rebuilt events take, and refuses past [`MAX_BATCH_BYTES`].
struct Budget(usize);

impl Budget {
    fn take(&mut self, n_bytes: usize) -> Result<(), ColumnsError> {
        self.0 = self.0.saturating_add(n_bytes);
        if self.0 > MAX_BATCH_BYTES {
            return Err(error(format!(
                "the events would take more than {MAX_BATCH_BYTES} bytes"
            )));
        }
        Ok(())
    }
}

impl Dict {
    /// Checks the dictionary against `n` rows; `optional` allows index 0 (absent).
    fn check(&self, what: &str, n: usize, optional: bool) -> Result<(), ColumnsError> {
        if self.indexes.len() != n {
            return Err(error(format!(
                "{what}: {} indexes for {n} events",
                self.indexes.len()
            )));
        }
        let first = if optional { 0 } else { 1 };
        if let Some(bad) = self
            .indexes
            .iter()
            .find(|&&i| i < first || i as usize > self.values.len())
        {
            return Err(error(format!(
                "{what}: index {bad} outside 1..={}",
                self.values.len()
            )));
        }
        Ok(())
    }

    fn get(&self, row: usize, budget: &mut Budget) -> Result<Option<String>, ColumnsError> {
        match self.indexes[row] {
            0 => Ok(None),
            i => {
                let text = &self.values[i as usize - 1];
                budget.take(text.len())?;
                Ok(Some(text.expand()))
            }
        }
    }
}

impl Columns {
    fn into_events(self, after_seq: u64, n: usize) -> Result<Vec<Event>, ColumnsError> {
        if self.n_events as usize != n {
            return Err(error(format!(
                "columns hold {} events, the header says {n}",
                self.n_events
            )));
        }
        for (what, len) in [
            ("seq", self.seq_deltas.len()),
            ("event_time", self.event_time_deltas.len()),
            ("receive_time", self.receive_lags.len()),
            ("source", self.sources.len()),
            ("event_id", self.event_ids.len()),
            ("score", self.scores.len()),
            ("tags", self.tags.len()),
        ] {
            if len != n {
                return Err(error(format!("{what}: {len} values for {n} events")));
            }
        }
        self.streams.check("stream", n, false)?;
        self.names.check("name", n, false)?;
        self.user_ids.check("user_id", n, true)?;
        self.session_ids.check("session_id", n, true)?;
        if let Some(bad) = self
            .tags
            .iter()
            .flatten()
            .find(|&&i| i as usize >= self.tag_values.len())
        {
            return Err(error(format!(
                "tags: index {bad} outside 0..{}",
                self.tag_values.len()
            )));
        }
        // Fixed fields of an event, about what postcard takes for them.
        let mut budget = Budget(0);
        budget.take(n.saturating_mul(32))?;
        let mut events = Vec::with_capacity(n);
        let (mut seq, mut time) = (after_seq, 0i64);
        for row in 0..n {
            seq = seq.wrapping_add(self.seq_deltas[row]);
            time = time.wrapping_add(self.event_time_deltas[row]);
            let event_id = match &self.event_ids[row] {
                None => None,
                Some(text) => {
                    budget.take(text.len())?;
                    Some(text.expand())
                }
            };
            let mut tags = Vec::with_capacity(self.tags[row].len());
            for &i in &self.tags[row] {
                let tag = &self.tag_values[i as usize];
                budget.take(tag.len() + 1)?;
                tags.push(tag.clone());
            }
            events.push(Event {
                seq,
                event_time_ms: time,
                receive_time_ms: time.wrapping_add(self.receive_lags[row]),
                source: self.sources[row],
                stream: self.streams.get(row, &mut budget)?.unwrap_or_default(),
                name: self.names.get(row, &mut budget)?.unwrap_or_default(),
                event_id,
                user_id: self.user_ids.get(row, &mut budget)?,
                session_id: self.session_ids.get(row, &mut budget)?,
                score: self.scores[row],
                tags,
                attrs: BTreeMap::new(),
            });
        }
        let mut previous_key: Option<&str> = None;
        for column in &self.attrs {
            if previous_key.is_some_and(|previous| previous >= column.key.as_str()) {
                return Err(error(format!(
                    "attribute columns out of order at {:?}",
                    column.key
                )));
            }
            previous_key = Some(&column.key);
            let n_cells = column.row_deltas.len();
            let n_values = match &column.values {
                AttrValues::Strings(dict) => {
                    dict.check(&column.key, n_cells, false)?;
                    n_cells
                }
                AttrValues::Ints(values) => values.len(),
                AttrValues::Values(values) => values.len(),
            };
            if n_values != n_cells {
                return Err(error(format!(
                    "attribute {:?}: {n_values} values for {n_cells} rows",
                    column.key
                )));
            }
            let mut row = 0usize;
            let mut int = 0i64;
            for (idx, &delta) in column.row_deltas.iter().enumerate() {
                if idx > 0 && delta == 0 {
                    return Err(error(format!("attribute {:?}: repeated row", column.key)));
                }
                row = row.saturating_add(delta as usize);
                if row >= n {
                    return Err(error(format!(
                        "attribute {:?}: row {row} of {n} events",
                        column.key
                    )));
                }
                let value = match &column.values {
                    AttrValues::Strings(dict) => {
                        Value::String(dict.get(idx, &mut budget)?.unwrap_or_default())
                    }
                    AttrValues::Ints(deltas) => {
                        int = int.wrapping_add(deltas[idx]);
                        Value::Int(int)
                    }
                    AttrValues::Values(values) => values[idx].clone(),
                };
                budget.take(column.key.len() + value.estimated_bytes())?;
                events[row].attrs.insert(column.key.clone(), value);
            }
        }
        Ok(events)
    }
}
