//! The column-wise batch layouts ([`Compression::ZstdColumns`] and [`Compression::ZstdColumns2`],
//! see [`Layout`]): the events of a batch transposed into one column per field before zstd, so
//! that what repeats across events sits side by side. Row-wise postcard interleaves a UUID, a
//! timestamp, a URL and a user agent per event, which leaves zstd little to find; column-wise,
//! timestamps become small deltas, low-cardinality strings (stream, name, user and session ids,
//! attribute values) become dictionary codes, UUIDs and hex ids travel as their 16 or 8 raw
//! bytes instead of 36 or 16 characters, and each attribute key is written once per batch.
//!
//! A layout is a postcard-encoded [`Columns`] (then, in the second layout, a side section of raw
//! id bytes); every transformation is exact, so decoding gives back the very events that were
//! encoded (property-tested in `tests/columnar.rs`). Decoding is hostile-input safe like the
//! row layout: lengths are checked against the event count before use, codes against their
//! dictionaries, and the bytes the events would take are counted as they are rebuilt, so a
//! small payload cannot expand past [`MAX_BATCH_BYTES`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::event::{Event, SourceKind, Value};
use crate::limits::MAX_BATCH_BYTES;
#[cfg(doc)]
use crate::wire::Compression;

/// Which column-wise layout a payload uses. Both decode to the same events; the second is
/// smaller and only sent to peers that speak protocol 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// [`Compression::ZstdColumns`](Compression::ZstdColumns), protocol 2: dictionary indexes
    /// per row, event times as deltas between events and receive times as lags.
    V1,
    /// [`Compression::ZstdColumns2`], protocol 3. Changes, each measured with `runnel-bench
    /// wire` (docs/BENCHMARKS.md):
    /// - string columns ([`Strings`]) say "the next new value" with one code instead of an
    ///   index per row, so a column of mostly distinct values (ids) costs its values alone;
    /// - event ids are such a column too, instead of an optional tagged value per row;
    /// - values of one shape travel without a tag or length each: UUIDs and hex ids as bare
    ///   bytes in a side section after the columns, which the batch codec compresses apart
    ///   (random bytes would widen zstd's literal codes for everything else), version-4 UUIDs
    ///   without their 6 fixed bits, and text that is mostly a few stems followed by a number
    ///   as a stem dictionary and a number column ([`Numbered`]);
    /// - receive times are the deltas (the agent stamps them in order, so they are mostly 0)
    ///   and event times the lags behind them.
    V2,
}

/// A batch, column by column, generic over how string columns travel: `S` for the dictionary
/// columns and `E` for event ids ([`V1Columns`] and [`V2Columns`]). Field order is the wire
/// order: never reorder, only append with a new layout variant.
#[derive(Debug, Serialize, Deserialize)]
struct Columns<S, E> {
    n_events: u32,
    /// `seq` minus the previous event's (the first: minus the batch's `after_seq`).
    seq_deltas: Vec<u64>,
    /// [`Layout::V1`]: `event_time_ms` minus the previous event's (the first: as is), then
    /// `receive_time_ms` minus the event's own `event_time_ms`. [`Layout::V2`]:
    /// `receive_time_ms` minus the previous event's (the first: as is), then `event_time_ms`
    /// minus the event's own `receive_time_ms`.
    times: (Vec<i64>, Vec<i64>),
    sources: Vec<SourceKind>,
    streams: S,
    names: S,
    event_ids: E,
    user_ids: S,
    session_ids: S,
    scores: Vec<Option<f64>>,
    /// Per event, indexes into `tag_values`.
    tags: Vec<Vec<u32>>,
    tag_values: Vec<String>,
    /// One column per attribute key, in key order.
    attrs: Vec<AttrColumn<S>>,
}

/// The protocol-2 layout.
type V1Columns = Columns<Dict, Vec<Option<Text>>>;
/// The protocol-3 layout.
type V2Columns = Columns<Strings, Strings>;

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

/// A string column of [`Layout::V2`]. `codes[i]` is 0 for "absent" (only in optional
/// columns), 1 for "the next value of `values` not used yet", and `k + 2` for `values[k]`
/// again. Values are in first-use order, so a column of distinct values is all 1s, which zstd
/// turns into almost nothing.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Strings {
    codes: Vec<u32>,
    values: Texts,
}

/// The values of a [`Strings`] column, in the most compact form all of them allow.
#[derive(Debug, Serialize, Deserialize)]
enum Texts {
    /// Any mix of forms, each value tagged.
    Mixed(Vec<Text>),
    /// All plain text.
    Plain(Vec<String>),
    /// All canonical UUIDs: this many, as their 16 bytes each in the side section.
    Uuids(u32),
    /// All canonical version-4 (random) UUIDs, the usual tracker event id: this many, in the
    /// side section without their 6 fixed bits ([`pack_uuids_v4`]).
    UuidsV4(u32),
    /// All hex ids of `width` bytes (`2 * width` digits): this many, back to back in the side
    /// section.
    Hex { width: u32, count: u32 },
    /// All plain text, most of it a few stems followed by a number (`u-000123`,
    /// `https://shop.example.com/shoes/p-01234`): each value split into its stem, by
    /// dictionary, and its trailing number.
    Numbered(Numbered),
}

/// Text values as a stem and a trailing decimal number: `stems[stem_indexes[i]]` followed by
/// `numbers[i]` zero-padded to `widths[i]` digits (no number when the width is 0).
#[derive(Debug, Serialize, Deserialize)]
struct Numbered {
    /// Distinct stems, in first-seen order.
    stems: Vec<String>,
    stem_indexes: Vec<u32>,
    widths: Vec<u8>,
    numbers: Vec<u64>,
}

/// Most digits of a trailing number: every 19-digit number fits a `u64`.
const MAX_NUMBER_DIGITS: usize = 19;

impl Default for Texts {
    fn default() -> Texts {
        Texts::Plain(Vec::new())
    }
}

/// The values of one attribute key: the events that have it and their values.
#[derive(Debug, Serialize, Deserialize)]
struct AttrColumn<S> {
    key: String,
    /// Indexes of the events that have the key, as deltas (the first: from 0), strictly
    /// increasing once summed.
    row_deltas: Vec<u32>,
    values: AttrValues<S>,
}

#[derive(Debug, Serialize, Deserialize)]
enum AttrValues<S> {
    /// Every value is a `Value::String`.
    Strings(S),
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

/// An uncompressed column-wise payload: the postcard-encoded columns, then the side section
/// (random ids as bare bytes, [`Layout::V2`] only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub bytes: Vec<u8>,
    /// Where the side section begins. It does not compress: compressing it apart keeps its
    /// bytes from widening the codes zstd gives the compressible rest.
    pub side_at: usize,
}

/// Encodes `events` (sequence numbers strictly increasing above `after_seq`; the caller checks)
/// into the uncompressed column-wise payload of `layout`.
pub fn encode(
    layout: Layout,
    after_seq: u64,
    events: &[Event],
) -> Result<Encoded, postcard::Error> {
    let mut side = Vec::new();
    let mut bytes = match layout {
        Layout::V1 => {
            postcard::to_stdvec(&V1Columns::transpose(layout, after_seq, events, &mut side))?
        }
        Layout::V2 => {
            postcard::to_stdvec(&V2Columns::transpose(layout, after_seq, events, &mut side))?
        }
    };
    let side_at = bytes.len();
    bytes.extend_from_slice(&side);
    Ok(Encoded { bytes, side_at })
}

/// Decodes a column-wise payload of `layout` holding `n_events` events above `after_seq`.
pub fn decode(
    layout: Layout,
    raw: &[u8],
    after_seq: u64,
    n_events: usize,
) -> Result<Vec<Event>, ColumnsError> {
    let decoded = |e| error(format!("columns do not decode: {e}"));
    let (columns, side) = match layout {
        Layout::V1 => {
            let (columns, mut side) =
                postcard::take_from_bytes::<V1Columns>(raw).map_err(decoded)?;
            (columns.normalize(n_events, &mut side)?, side)
        }
        Layout::V2 => {
            let (columns, mut side) =
                postcard::take_from_bytes::<V2Columns>(raw).map_err(decoded)?;
            (columns.normalize(n_events, &mut side)?, side)
        }
    };
    if !side.is_empty() {
        return Err(error(format!(
            "{} unexpected bytes after the columns",
            side.len()
        )));
    }
    columns.into_events(layout, after_seq, n_events)
}

/// How a layout writes a string column, from and to the [`Dict`] form both ends work with.
trait StringColumn: Sized {
    /// From a dictionary built in first-seen order ([`DictBuilder`]). Values that are random
    /// bytes (UUIDs, hex ids) may go to `side`, the section after the columns.
    fn from_dict(dict: Dict, side: &mut Vec<u8>) -> Self;
    /// Back to a dictionary, checked against `n` rows; `optional` allows absent values. Takes
    /// its values from the front of `side` if it put them there.
    fn into_dict(
        self,
        what: &str,
        n: usize,
        optional: bool,
        side: &mut &[u8],
    ) -> Result<Dict, ColumnsError>;
}

impl StringColumn for Dict {
    fn from_dict(dict: Dict, _side: &mut Vec<u8>) -> Dict {
        dict
    }

    fn into_dict(
        self,
        what: &str,
        n: usize,
        optional: bool,
        _side: &mut &[u8],
    ) -> Result<Dict, ColumnsError> {
        self.check(what, n, optional)?;
        Ok(self)
    }
}

/// [`Layout::V1`]'s event ids: one optional value per row.
impl StringColumn for Vec<Option<Text>> {
    fn from_dict(dict: Dict, _side: &mut Vec<u8>) -> Self {
        dict.indexes
            .iter()
            .map(|&i| i.checked_sub(1).map(|k| dict.values[k as usize].clone()))
            .collect()
    }

    fn into_dict(
        self,
        what: &str,
        n: usize,
        _optional: bool,
        _side: &mut &[u8],
    ) -> Result<Dict, ColumnsError> {
        if self.len() != n {
            return Err(error(format!(
                "{what}: {} values for {n} events",
                self.len()
            )));
        }
        let mut dict = Dict::default();
        for text in self {
            dict.indexes.push(match text {
                None => 0,
                Some(text) => {
                    dict.values.push(text);
                    dict.values.len() as u32
                }
            });
        }
        Ok(dict)
    }
}

impl StringColumn for Strings {
    fn from_dict(dict: Dict, side: &mut Vec<u8>) -> Strings {
        // First-seen order: a value's first row is the one where its index is the next unused.
        let mut next_new = 1;
        let codes = dict
            .indexes
            .iter()
            .map(|&i| match i {
                0 => 0,
                i if i == next_new => {
                    next_new += 1;
                    1
                }
                i => i + 1,
            })
            .collect();
        Strings {
            codes,
            values: Texts::from_values(dict.values, side),
        }
    }

    fn into_dict(
        self,
        what: &str,
        n: usize,
        optional: bool,
        side: &mut &[u8],
    ) -> Result<Dict, ColumnsError> {
        if self.codes.len() != n {
            return Err(error(format!(
                "{what}: {} codes for {n} events",
                self.codes.len()
            )));
        }
        let values = self.values.into_values(what, side)?;
        let mut used = 0u32;
        let mut indexes = Vec::with_capacity(n);
        for code in self.codes {
            indexes.push(match code {
                0 if optional => 0,
                0 => return Err(error(format!("{what}: a value is missing"))),
                1 if (used as usize) < values.len() => {
                    used += 1;
                    used
                }
                1 => {
                    return Err(error(format!(
                        "{what}: more new values than the {} given",
                        values.len()
                    )));
                }
                code if code - 1 <= used => code - 1,
                code => {
                    return Err(error(format!(
                        "{what}: code {code} refers to a value not used yet ({used} are)"
                    )));
                }
            });
        }
        if used as usize != values.len() {
            return Err(error(format!(
                "{what}: {} values given, {used} used",
                values.len()
            )));
        }
        Ok(Dict { values, indexes })
    }
}

impl Texts {
    fn from_values(values: Vec<Text>, side: &mut Vec<u8>) -> Texts {
        if values.is_empty() || values.iter().all(|t| matches!(t, Text::Plain(_))) {
            let values: Vec<String> = values
                .into_iter()
                .map(|t| match t {
                    Text::Plain(text) => text,
                    _ => unreachable!("checked above"),
                })
                .collect();
            return match Numbered::split(&values) {
                Some(numbered) => Texts::Numbered(numbered),
                None => Texts::Plain(values),
            };
        }
        if values
            .iter()
            .all(|t| matches!(t, Text::Uuid(bytes) if is_uuid_v4(bytes)))
        {
            let uuids: Vec<[u8; 16]> = values
                .iter()
                .filter_map(|t| match t {
                    Text::Uuid(bytes) => Some(*bytes),
                    _ => None,
                })
                .collect();
            pack_uuids_v4(&uuids, side);
            return Texts::UuidsV4(uuids.len() as u32);
        }
        if values.iter().all(|t| matches!(t, Text::Uuid(_))) {
            for t in &values {
                if let Text::Uuid(bytes) = t {
                    side.extend_from_slice(bytes);
                }
            }
            return Texts::Uuids(values.len() as u32);
        }
        if let Text::Hex(first) = &values[0] {
            let width = first.len();
            if values
                .iter()
                .all(|t| matches!(t, Text::Hex(bytes) if bytes.len() == width))
            {
                for t in &values {
                    if let Text::Hex(bytes) = t {
                        side.extend_from_slice(bytes);
                    }
                }
                return Texts::Hex {
                    width: width as u32,
                    count: values.len() as u32,
                };
            }
        }
        Texts::Mixed(values)
    }

    fn into_values(self, what: &str, side: &mut &[u8]) -> Result<Vec<Text>, ColumnsError> {
        Ok(match self {
            Texts::Mixed(values) => values,
            Texts::Plain(values) => values.into_iter().map(Text::Plain).collect(),
            Texts::Numbered(numbered) => numbered.join(what)?,
            Texts::Uuids(count) => take_side(what, side, 16, count)?
                .chunks_exact(16)
                .map(|chunk| Text::Uuid(chunk.try_into().expect("16-byte chunks")))
                .collect(),
            Texts::UuidsV4(count) => unpack_uuids_v4(what, side, count)?
                .into_iter()
                .map(Text::Uuid)
                .collect(),
            Texts::Hex { width, count } => {
                // Hex ids are at least 8 digits ([`parse_hex`]); anything shorter is not ours.
                if width < 4 {
                    return Err(error(format!("{what}: hex ids {width} bytes wide")));
                }
                let width = width as usize;
                take_side(what, side, width, count)?
                    .chunks_exact(width)
                    .map(|chunk| Text::Hex(chunk.to_vec()))
                    .collect()
            }
        })
    }
}

/// A version-4 UUID: version nibble 4, variant bits `10`; the other 122 bits are random.
fn is_uuid_v4(bytes: &[u8; 16]) -> bool {
    bytes[6] >> 4 == 4 && bytes[8] >> 6 == 0b10
}

/// Random bits of a version-4 UUID outside the 14 whole random bytes: the low nibble of byte 6
/// and the low 6 bits of byte 8.
const UUID_V4_SPARE_BITS: usize = 10;

/// Writes version-4 UUIDs as 15.25 bytes each: the 14 bytes other than 6 and 8 of every UUID,
/// then the 10 random bits of bytes 6 and 8 of every UUID packed little-endian.
fn pack_uuids_v4(uuids: &[[u8; 16]], side: &mut Vec<u8>) {
    for uuid in uuids {
        side.extend_from_slice(&uuid[..6]);
        side.push(uuid[7]);
        side.extend_from_slice(&uuid[9..]);
    }
    let (mut bits, mut n_bits) = (0u32, 0usize);
    for uuid in uuids {
        bits |= (u32::from(uuid[6] & 0x0f) << 6 | u32::from(uuid[8] & 0x3f)) << n_bits;
        n_bits += UUID_V4_SPARE_BITS;
        while n_bits >= 8 {
            side.push(bits as u8);
            bits >>= 8;
            n_bits -= 8;
        }
    }
    if n_bits > 0 {
        side.push(bits as u8);
    }
}

fn unpack_uuids_v4(
    what: &str,
    side: &mut &[u8],
    count: u32,
) -> Result<Vec<[u8; 16]>, ColumnsError> {
    let wholes = take_side(what, side, 14, count)?;
    let n_spare_bytes = (count as usize * UUID_V4_SPARE_BITS).div_ceil(8);
    let spares = take_side(what, side, n_spare_bytes, 1)?;
    let (mut spare_bytes, mut bits, mut n_bits) = (spares.iter(), 0u32, 0usize);
    let mut uuids = Vec::with_capacity(count as usize);
    for whole in wholes.chunks_exact(14) {
        while n_bits < UUID_V4_SPARE_BITS {
            bits |= u32::from(*spare_bytes.next().expect("sized above")) << n_bits;
            n_bits += 8;
        }
        let spare = bits & 0x3ff;
        bits >>= UUID_V4_SPARE_BITS;
        n_bits -= UUID_V4_SPARE_BITS;
        let mut uuid = [0u8; 16];
        uuid[..6].copy_from_slice(&whole[..6]);
        uuid[6] = 0x40 | (spare >> 6) as u8;
        uuid[7] = whole[6];
        uuid[8] = 0x80 | (spare & 0x3f) as u8;
        uuid[9..].copy_from_slice(&whole[7..]);
        uuids.push(uuid);
    }
    Ok(uuids)
}

/// The next `count` values of `width` bytes from the side section.
fn take_side<'a>(
    what: &str,
    side: &mut &'a [u8],
    width: usize,
    count: u32,
) -> Result<&'a [u8], ColumnsError> {
    let n_bytes = width
        .checked_mul(count as usize)
        .filter(|&n| n <= side.len())
        .ok_or_else(|| {
            error(format!(
                "{what}: {count} values of {width} bytes, {} bytes left",
                side.len()
            ))
        })?;
    let (taken, rest) = side.split_at(n_bytes);
    *side = rest;
    Ok(taken)
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

impl Numbered {
    /// The values split, if most of them share their stem with another value: otherwise the
    /// stems would cost as much as the values and the numbers come on top.
    fn split(values: &[String]) -> Option<Numbered> {
        let mut index: BTreeMap<&str, u32> = BTreeMap::new();
        let mut numbered = Numbered {
            stems: Vec::new(),
            stem_indexes: Vec::with_capacity(values.len()),
            widths: Vec::with_capacity(values.len()),
            numbers: Vec::with_capacity(values.len()),
        };
        for value in values {
            let digits = value
                .bytes()
                .rev()
                .take(MAX_NUMBER_DIGITS)
                .take_while(u8::is_ascii_digit)
                .count();
            // ASCII digits: the split is on a character boundary.
            let (stem, number) = value.split_at(value.len() - digits);
            let next = index.len() as u32;
            numbered
                .stem_indexes
                .push(*index.entry(stem).or_insert_with(|| {
                    numbered.stems.push(stem.to_owned());
                    next
                }));
            numbered.widths.push(digits as u8);
            numbered.numbers.push(number.parse().unwrap_or(0));
        }
        let has_numbers = numbered.widths.iter().any(|&w| w > 0);
        (has_numbers && numbered.stems.len() * 2 <= values.len()).then_some(numbered)
    }

    fn join(self, what: &str) -> Result<Vec<Text>, ColumnsError> {
        let n = self.stem_indexes.len();
        if self.widths.len() != n || self.numbers.len() != n {
            return Err(error(format!(
                "{what}: {n} stems, {} widths and {} numbers",
                self.widths.len(),
                self.numbers.len()
            )));
        }
        let mut budget = Budget(0);
        let mut values = Vec::with_capacity(n);
        for ((&stem, &width), &number) in self
            .stem_indexes
            .iter()
            .zip(&self.widths)
            .zip(&self.numbers)
        {
            let stem = self
                .stems
                .get(stem as usize)
                .ok_or_else(|| error(format!("{what}: stem {stem} of {}", self.stems.len())))?;
            let width = usize::from(width);
            let fits = match width {
                0 => number == 0,
                1..=MAX_NUMBER_DIGITS => number < 10u64.pow(width as u32),
                _ => false,
            };
            if !fits {
                return Err(error(format!(
                    "{what}: number {number} does not fit {width} digits"
                )));
            }
            // Each value is built here, so a payload of many values naming one long stem
            // must not expand past the batch limit.
            budget.take(stem.len() + width)?;
            values.push(Text::Plain(if width == 0 {
                stem.clone()
            } else {
                format!("{stem}{number:0width$}")
            }));
        }
        Ok(values)
    }
}

/// Builds a [`Dict`] in first-seen order.
#[derive(Default)]
struct DictBuilder<'a> {
    index: BTreeMap<&'a str, u32>,
    dict: Dict,
}

impl<'a> DictBuilder<'a> {
    fn push(&mut self, value: Option<&'a str>) {
        let index = match value {
            None => 0,
            Some(text) => {
                let next = self.index.len() as u32 + 1;
                *self.index.entry(text).or_insert_with(|| {
                    self.dict.values.push(Text::from_str(text));
                    next
                })
            }
        };
        self.dict.indexes.push(index);
    }

    fn finish<S: StringColumn>(self, side: &mut Vec<u8>) -> S {
        S::from_dict(self.dict, side)
    }
}

impl<S: StringColumn> AttrColumn<S> {
    fn build(key: &str, cells: &[(u32, &Value)], side: &mut Vec<u8>) -> AttrColumn<S> {
        let mut row_deltas = Vec::with_capacity(cells.len());
        let mut previous = 0u32;
        for (idx, (row, _)) in cells.iter().enumerate() {
            row_deltas.push(if idx == 0 { *row } else { row - previous });
            previous = *row;
        }
        let values = if cells.iter().all(|(_, v)| matches!(v, Value::String(_))) {
            let mut builder = DictBuilder::default();
            for (_, value) in cells {
                if let Value::String(text) = value {
                    builder.push(Some(text));
                }
            }
            AttrValues::Strings(builder.finish(side))
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

    fn normalize(self, side: &mut &[u8]) -> Result<AttrColumn<Dict>, ColumnsError> {
        let n_cells = self.row_deltas.len();
        let values = match self.values {
            AttrValues::Strings(strings) => {
                AttrValues::Strings(strings.into_dict(&self.key, n_cells, false, side)?)
            }
            AttrValues::Ints(values) => AttrValues::Ints(values),
            AttrValues::Values(values) => AttrValues::Values(values),
        };
        Ok(AttrColumn {
            key: self.key,
            row_deltas: self.row_deltas,
            values,
        })
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

impl<S: StringColumn, E: StringColumn> Columns<S, E> {
    /// The events transposed; string columns may put values in `side` ([`StringColumn`]).
    fn transpose(
        layout: Layout,
        after_seq: u64,
        events: &[Event],
        side: &mut Vec<u8>,
    ) -> Columns<S, E> {
        let n = events.len();
        let mut seq_deltas = Vec::with_capacity(n);
        let mut times = (Vec::with_capacity(n), Vec::with_capacity(n));
        let mut streams = DictBuilder::default();
        let mut names = DictBuilder::default();
        let mut event_ids = DictBuilder::default();
        let mut user_ids = DictBuilder::default();
        let mut session_ids = DictBuilder::default();
        let mut tags = Vec::with_capacity(n);
        let mut tag_values = Vec::new();
        let mut tag_index: BTreeMap<&str, u32> = BTreeMap::new();
        let mut attrs: BTreeMap<&str, Vec<(u32, &Value)>> = BTreeMap::new();
        let (mut previous_seq, mut previous_time) = (after_seq, 0i64);
        for (row, event) in events.iter().enumerate() {
            seq_deltas.push(event.seq.wrapping_sub(previous_seq));
            previous_seq = event.seq;
            let (first, second) = match layout {
                Layout::V1 => (event.event_time_ms, event.receive_time_ms),
                Layout::V2 => (event.receive_time_ms, event.event_time_ms),
            };
            times.0.push(first.wrapping_sub(previous_time));
            times.1.push(second.wrapping_sub(first));
            previous_time = first;
            streams.push(Some(&event.stream));
            names.push(Some(&event.name));
            event_ids.push(event.event_id.as_deref());
            user_ids.push(event.user_id.as_deref());
            session_ids.push(event.session_id.as_deref());
            tags.push(
                event
                    .tags
                    .iter()
                    .map(|tag| {
                        let next = tag_index.len() as u32;
                        *tag_index.entry(tag.as_str()).or_insert_with(|| {
                            tag_values.push(tag.clone());
                            next
                        })
                    })
                    .collect(),
            );
            let row = u32::try_from(row).unwrap_or(u32::MAX);
            for (key, value) in &event.attrs {
                attrs.entry(key.as_str()).or_default().push((row, value));
            }
        }
        Columns {
            n_events: u32::try_from(n).unwrap_or(u32::MAX),
            seq_deltas,
            times,
            sources: events.iter().map(|e| e.source).collect(),
            // Fields are evaluated in this order, which `normalize` follows to read `side`.
            streams: streams.finish(side),
            names: names.finish(side),
            event_ids: event_ids.finish(side),
            user_ids: user_ids.finish(side),
            session_ids: session_ids.finish(side),
            scores: events.iter().map(|e| e.score).collect(),
            tags,
            tag_values,
            attrs: attrs
                .into_iter()
                .map(|(key, cells)| AttrColumn::build(key, &cells, side))
                .collect(),
        }
    }

    /// The string columns as dictionaries, checked against the `n` events of the header.
    fn normalize(self, n: usize, side: &mut &[u8]) -> Result<Columns<Dict, Dict>, ColumnsError> {
        if self.n_events as usize != n {
            return Err(error(format!(
                "columns hold {} events, the header says {n}",
                self.n_events
            )));
        }
        Ok(Columns {
            n_events: self.n_events,
            seq_deltas: self.seq_deltas,
            times: self.times,
            sources: self.sources,
            streams: self.streams.into_dict("stream", n, false, side)?,
            names: self.names.into_dict("name", n, false, side)?,
            event_ids: self.event_ids.into_dict("event_id", n, true, side)?,
            user_ids: self.user_ids.into_dict("user_id", n, true, side)?,
            session_ids: self.session_ids.into_dict("session_id", n, true, side)?,
            scores: self.scores,
            tags: self.tags,
            tag_values: self.tag_values,
            attrs: self
                .attrs
                .into_iter()
                .map(|column| column.normalize(side))
                .collect::<Result<_, _>>()?,
        })
    }
}

impl Columns<Dict, Dict> {
    fn into_events(
        self,
        layout: Layout,
        after_seq: u64,
        n: usize,
    ) -> Result<Vec<Event>, ColumnsError> {
        for (what, len) in [
            ("seq", self.seq_deltas.len()),
            ("time", self.times.0.len()),
            ("time lag", self.times.1.len()),
            ("source", self.sources.len()),
            ("score", self.scores.len()),
            ("tags", self.tags.len()),
        ] {
            if len != n {
                return Err(error(format!("{what}: {len} values for {n} events")));
            }
        }
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
            time = time.wrapping_add(self.times.0[row]);
            let lagged = time.wrapping_add(self.times.1[row]);
            let (event_time_ms, receive_time_ms) = match layout {
                Layout::V1 => (time, lagged),
                Layout::V2 => (lagged, time),
            };
            let mut tags = Vec::with_capacity(self.tags[row].len());
            for &i in &self.tags[row] {
                let tag = &self.tag_values[i as usize];
                budget.take(tag.len() + 1)?;
                tags.push(tag.clone());
            }
            events.push(Event {
                seq,
                event_time_ms,
                receive_time_ms,
                source: self.sources[row],
                stream: self.streams.get(row, &mut budget)?.unwrap_or_default(),
                name: self.names.get(row, &mut budget)?.unwrap_or_default(),
                event_id: self.event_ids.get(row, &mut budget)?,
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
                AttrValues::Strings(dict) => dict.indexes.len(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn dict(values: &[&str], indexes: &[u32]) -> Dict {
        Dict {
            values: values.iter().map(|v| Text::from_str(v)).collect(),
            indexes: indexes.to_vec(),
        }
    }

    /// The form a column of distinct `values` takes, and the values it decodes back to.
    fn round_trip(values: &[&str]) -> (Texts, Vec<String>) {
        let indexes: Vec<u32> = (1..=values.len() as u32).collect();
        let texts = Strings::from_dict(dict(values, &indexes), &mut Vec::new()).values;
        let mut side = Vec::new();
        let strings = Strings::from_dict(dict(values, &indexes), &mut side);
        let mut rest = side.as_slice();
        let back = strings
            .into_dict("x", values.len(), false, &mut rest)
            .unwrap_or_else(|e| panic!("{values:?} ({texts:?}): {e}"));
        assert!(rest.is_empty(), "{values:?}: side bytes left over");
        (texts, back.values.iter().map(Text::expand).collect())
    }

    #[test]
    fn strings_say_new_or_which_value_again() {
        let mut side = Vec::new();
        let strings = Strings::from_dict(dict(&["a", "b", "c"], &[1, 0, 2, 1, 3, 2, 0]), &mut side);
        assert_eq!(strings.codes, [1, 0, 1, 2, 1, 3, 0]);
        let back = strings
            .into_dict("x", 7, true, &mut side.as_slice())
            .expect("valid codes");
        assert_eq!(back.indexes, [1, 0, 2, 1, 3, 2, 0]);
    }

    #[test]
    fn strings_pick_the_most_compact_values() {
        let v4 = "0f8e6a7c-1d2b-4c3d-9e8f-a1b2c3d4e5f6";
        let v4_max = "ffffffff-ffff-4fff-bfff-ffffffffffff";
        let v4_min = "00000000-0000-4000-8000-000000000000";
        let v1 = "6ba7b810-9dad-11d1-80b4-00c04fd430c8";
        type Expected = fn(&Texts) -> bool;
        let cases: [(&[&str], Expected); 11] = [
            (&[v4, v4_max, v4_min], |t| matches!(t, Texts::UuidsV4(3))),
            (&[v4], |t| matches!(t, Texts::UuidsV4(1))),
            (&[v4, v1], |t| matches!(t, Texts::Uuids(2))),
            (&["0123456789abcdef", "fedcba9876543210"], |t| {
                matches!(t, Texts::Hex { width: 8, count: 2 })
            }),
            // Hex ids of two widths cannot share one width.
            (&["0123456789abcdef", "01234567"], |t| {
                matches!(t, Texts::Mixed(_))
            }),
            (&["u-000001", v4], |t| matches!(t, Texts::Mixed(_))),
            // Numbers after shared stems: zero padding, no number, 19 digits, 20 digits (the
            // first stays in the stem), a bare number.
            (
                &[
                    "u-000001",
                    "u-99",
                    "u-",
                    "u-1234567890123456789",
                    "u-12345678901234567890",
                    "u-0",
                    "7",
                    "u-",
                ],
                |t| matches!(t, Texts::Numbered(n) if n.stems.len() == 3),
            ),
            // Stems that do not repeat stay plain.
            (&["u-000001", "page_view"], |t| matches!(t, Texts::Plain(_))),
            (&["a1", "b2", "c3", "d4"], |t| matches!(t, Texts::Plain(_))),
            // Repeated stems but no numbers: plain.
            (&["ab", "ab"], |t| matches!(t, Texts::Plain(_))),
            (&["é1", "é2", "é3"], |t| matches!(t, Texts::Numbered(_))),
        ];
        for (values, expected) in cases {
            let (texts, back) = round_trip(values);
            assert!(expected(&texts), "{values:?}: {texts:?}");
            assert_eq!(back, values);
        }
    }

    #[test]
    fn hostile_strings_are_refused() {
        let two = || Texts::Plain(vec!["a".into(), "b".into()]);
        // One value: stem index, width, number.
        let numbered = |stem: u32, width: u8, number: u64| {
            Texts::Numbered(Numbered {
                stems: vec!["u-".into()],
                stem_indexes: vec![stem],
                widths: vec![width],
                numbers: vec![number],
            })
        };
        let cases: Vec<(Vec<u32>, Texts, &[u8], &str)> = vec![
            (vec![1, 3, 2], two(), &[], "not used yet"),
            (vec![1, 1, 1], two(), &[], "more new values"),
            (vec![1, 2, 2], two(), &[], "2 values given, 1 used"),
            (vec![1, 0, 1], two(), &[], "missing"),
            (vec![1, 1], two(), &[], "2 codes for 3 events"),
            (
                vec![1],
                Texts::Hex { width: 2, count: 1 },
                &[1, 2],
                "2 bytes wide",
            ),
            (
                vec![1],
                Texts::Hex { width: 4, count: 1 },
                &[1, 2, 3],
                "3 bytes left",
            ),
            (
                vec![1],
                Texts::Hex {
                    width: u32::MAX,
                    count: u32::MAX,
                },
                &[1],
                "1 bytes left",
            ),
            (vec![1], Texts::Uuids(1), &[0; 15], "15 bytes left"),
            (vec![1], Texts::UuidsV4(1), &[0; 15], "1 values of 2 bytes"),
            (vec![1], numbered(1, 1, 0), &[], "stem 1 of 1"),
            (vec![1], numbered(0, 2, 100), &[], "does not fit 2"),
            (vec![1], numbered(0, 0, 1), &[], "does not fit 0"),
            (vec![1], numbered(0, 20, 1), &[], "does not fit 20"),
            (
                vec![1],
                Texts::Numbered(Numbered {
                    stems: vec!["u-".into()],
                    stem_indexes: vec![0, 0],
                    widths: vec![1],
                    numbers: vec![1],
                }),
                &[],
                "2 stems, 1 widths",
            ),
        ];
        for (codes, values, side, expected) in cases {
            let n = if codes.len() == 2 { 3 } else { codes.len() };
            let refused = Strings {
                codes: codes.clone(),
                values,
            }
            .into_dict("x", n, false, &mut &side[..])
            .expect_err("hostile codes");
            assert!(refused.0.contains(expected), "{codes:?}: {refused}");
        }
    }

    /// Many values naming one long stem must not expand past the batch limit.
    #[test]
    fn a_stem_bomb_is_refused() {
        let n = 10_000;
        let bomb = Texts::Numbered(Numbered {
            stems: vec!["x".repeat(10_000)],
            stem_indexes: vec![0; n],
            widths: vec![1; n],
            numbers: (0..n as u64).map(|i| i % 10).collect(),
        });
        let refused = bomb.into_values("x", &mut &[][..]).expect_err("too large");
        assert!(refused.0.contains("more than"), "{refused}");
    }

    #[test]
    fn v4_uuids_pack_into_fifteen_and_a_quarter_bytes() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for count in 0..12usize {
            let uuids: Vec<[u8; 16]> = (0..count)
                .map(|_| {
                    let mut uuid = [0u8; 16];
                    for byte in &mut uuid {
                        state = state
                            .wrapping_mul(6_364_136_223_846_793_005)
                            .wrapping_add(1);
                        *byte = (state >> 56) as u8;
                    }
                    uuid[6] = 0x40 | (uuid[6] & 0x0f);
                    uuid[8] = 0x80 | (uuid[8] & 0x3f);
                    uuid
                })
                .collect();
            let mut side = Vec::new();
            pack_uuids_v4(&uuids, &mut side);
            assert_eq!(side.len(), 14 * count + (10 * count).div_ceil(8));
            let mut rest = side.as_slice();
            let back = unpack_uuids_v4("x", &mut rest, count as u32).expect("packed above");
            assert_eq!(back, uuids);
            assert!(rest.is_empty());
        }
    }
}
