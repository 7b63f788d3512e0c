//! The state of one window definition: per key, the open panes and their accumulators; the
//! watermark; closing, lateness, the future bound and eviction. Pure: no clock (time comes in as
//! `now_ms`), no I/O and no CEL (values come in already extracted), so every decision can be
//! tested with explicit times.
//!
//! A window definition cuts event time into panes of `slide_ms` aligned to the Unix epoch. A
//! window starting at `s` (a multiple of `slide_ms`) covers `[s, s + size_ms)`, which is
//! `size_ms / slide_ms` panes; tumbling windows are the case `slide_ms == size_ms`. An event
//! updates exactly one pane; a window's values are its panes merged when it closes. A window
//! closes when the watermark reaches `end + lateness_ms`; a pane is dropped when the last
//! window covering it (the one starting at the pane) closes.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use runnel_common::Value;
use runnel_config::AggregateFunction;
use serde::{Deserialize, Serialize};

/// Most distinct-value hashes one window definition holds across all keys and panes (8 bytes
/// each plus the set's overhead: tens of MB at most). Values past it are not remembered and
/// counted, so a distinct count can only come out low, never high.
pub const MAX_DISTINCT_ENTRIES: usize = 1_000_000;

/// What the state needs of a window definition.
#[derive(Debug, Clone)]
pub struct Spec {
    pub size_ms: i64,
    pub slide_ms: i64,
    pub lateness_ms: i64,
    pub max_future_ms: i64,
    pub max_keys: usize,
    pub aggregates: Vec<AggregateSpec>,
}

/// One aggregate: its function, and for `count` whether it counts every event (no argument).
#[derive(Debug, Clone, Copy)]
pub struct AggregateSpec {
    pub function: AggregateFunction,
    pub counts_events: bool,
}

/// One part of a group key. Floats are kept as their bits so keys hash and compare exactly.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum KeyPart {
    Null,
    Bool(bool),
    Int(i64),
    Float(u64),
    Str(String),
    Bytes(Vec<u8>),
    Json(String),
}

impl KeyPart {
    /// The key part of an extracted value (`None`: the field is absent, same as null).
    pub fn from_value(value: Option<Value>) -> KeyPart {
        match value {
            None | Some(Value::Null) => KeyPart::Null,
            Some(Value::Bool(b)) => KeyPart::Bool(b),
            Some(Value::Int(i)) => KeyPart::Int(i),
            Some(Value::Float(f)) => KeyPart::Float(f.to_bits()),
            Some(Value::String(s)) => KeyPart::Str(s),
            Some(Value::Bytes(b)) => KeyPart::Bytes(b),
            Some(Value::Json(j)) => KeyPart::Json(j),
        }
    }

    pub fn to_value(&self) -> Value {
        match self {
            KeyPart::Null => Value::Null,
            KeyPart::Bool(b) => Value::Bool(*b),
            KeyPart::Int(i) => Value::Int(*i),
            KeyPart::Float(bits) => Value::Float(f64::from_bits(*bits)),
            KeyPart::Str(s) => Value::String(s.clone()),
            KeyPart::Bytes(b) => Value::Bytes(b.clone()),
            KeyPart::Json(j) => Value::Json(j.clone()),
        }
    }
}

/// A group key: one part per key expression.
pub type Key = Vec<KeyPart>;

/// A number as it came: integer sums stay integers until one float (or an overflow) comes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Num {
    Int(i64),
    Float(f64),
}

impl Num {
    /// Numbers only: other values (and non-finite floats) are left out of numeric aggregates.
    fn of(value: &Value) -> Option<Num> {
        match value {
            Value::Int(i) => Some(Num::Int(*i)),
            Value::Float(f) if f.is_finite() => Some(Num::Float(*f)),
            _ => None,
        }
    }

    fn as_f64(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Float(f) => f,
        }
    }

    fn to_value(self) -> Value {
        match self {
            Num::Int(i) => Value::Int(i),
            Num::Float(f) => Value::Float(f),
        }
    }
}

/// A running sum: exact in `i64` while every input is an integer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NumSum {
    n: u64,
    float: f64,
    /// `None` once a float came or the integer sum overflowed.
    int: Option<i64>,
}

impl Default for NumSum {
    fn default() -> NumSum {
        NumSum {
            n: 0,
            float: 0.0,
            int: Some(0),
        }
    }
}

impl NumSum {
    fn add(&mut self, num: Num) {
        self.n += 1;
        self.float += num.as_f64();
        self.int = match (self.int, num) {
            (Some(sum), Num::Int(i)) => sum.checked_add(i),
            _ => None,
        };
    }

    fn merge(&mut self, other: &NumSum) {
        self.n += other.n;
        self.float += other.float;
        self.int = match (self.int, other.int) {
            (Some(a), Some(b)) => a.checked_add(b),
            _ => None,
        };
    }

    fn sum(&self) -> Value {
        match self.int {
            Some(i) => Value::Int(i),
            None => Value::Float(self.float),
        }
    }

    fn avg(&self) -> Value {
        if self.n == 0 {
            return Value::Null;
        }
        Value::Float(self.float / self.n as f64)
    }
}

/// The accumulator of one aggregate in one pane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Acc {
    Count(u64),
    Sum(NumSum),
    Avg(NumSum),
    Min(Option<Num>),
    Max(Option<Num>),
    /// Hashes of the distinct values ([`value_hash`]).
    Distinct(HashSet<u64>),
}

impl Acc {
    fn new(function: AggregateFunction) -> Acc {
        match function {
            AggregateFunction::Count => Acc::Count(0),
            AggregateFunction::Sum => Acc::Sum(NumSum::default()),
            AggregateFunction::Avg => Acc::Avg(NumSum::default()),
            AggregateFunction::Min => Acc::Min(None),
            AggregateFunction::Max => Acc::Max(None),
            AggregateFunction::Distinct => Acc::Distinct(HashSet::new()),
        }
    }

    /// Adds one input; returns whether a distinct hash was dropped for lack of room (`room` is
    /// decremented by every hash added).
    fn add(&mut self, spec: AggregateSpec, input: Option<&Value>, room: &mut usize) -> bool {
        let present = input.filter(|v| !matches!(v, Value::Null));
        match self {
            Acc::Count(n) => {
                if spec.counts_events || present.is_some() {
                    *n += 1;
                }
            }
            Acc::Sum(sum) | Acc::Avg(sum) => {
                if let Some(num) = present.and_then(Num::of) {
                    sum.add(num);
                }
            }
            Acc::Min(min) => {
                if let Some(num) = present.and_then(Num::of)
                    && min.is_none_or(|m| num.as_f64() < m.as_f64())
                {
                    *min = Some(num);
                }
            }
            Acc::Max(max) => {
                if let Some(num) = present.and_then(Num::of)
                    && max.is_none_or(|m| num.as_f64() > m.as_f64())
                {
                    *max = Some(num);
                }
            }
            Acc::Distinct(set) => {
                if let Some(value) = present {
                    let hash = value_hash(value);
                    if !set.contains(&hash) {
                        if *room == 0 {
                            return true;
                        }
                        set.insert(hash);
                        *room -= 1;
                    }
                }
            }
        }
        false
    }

    fn merge(&mut self, other: &Acc) {
        match (self, other) {
            (Acc::Count(a), Acc::Count(b)) => *a += b,
            (Acc::Sum(a), Acc::Sum(b)) | (Acc::Avg(a), Acc::Avg(b)) => a.merge(b),
            (Acc::Min(a), Acc::Min(Some(b))) if a.is_none_or(|m| b.as_f64() < m.as_f64()) => {
                *a = Some(*b);
            }
            (Acc::Max(a), Acc::Max(Some(b))) if a.is_none_or(|m| b.as_f64() > m.as_f64()) => {
                *a = Some(*b);
            }
            (Acc::Distinct(a), Acc::Distinct(b)) => a.extend(b.iter().copied()),
            _ => {}
        }
    }

    fn value(&self) -> Value {
        match self {
            Acc::Count(n) => Value::Int(i64::try_from(*n).unwrap_or(i64::MAX)),
            Acc::Sum(sum) => sum.sum(),
            Acc::Avg(sum) => sum.avg(),
            Acc::Min(num) | Acc::Max(num) => num.map_or(Value::Null, Num::to_value),
            Acc::Distinct(set) => Value::Int(i64::try_from(set.len()).unwrap_or(i64::MAX)),
        }
    }

    fn n_distinct(&self) -> usize {
        match self {
            Acc::Distinct(set) => set.len(),
            _ => 0,
        }
    }
}

/// A stable 64-bit hash (FNV-1a) of a value's type and content: saved state must mean the same
/// after a restart, which rules out the std hasher's random keys. A float with an integer value
/// hashes as that integer (JSON `1` and `1.0` are one value).
pub fn value_hash(value: &Value) -> u64 {
    fn fnv(tag: u8, bytes: &[u8]) -> u64 {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in std::iter::once(&tag).chain(bytes) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        hash
    }
    match value {
        Value::Null => fnv(0, &[]),
        Value::Bool(b) => fnv(1, &[u8::from(*b)]),
        Value::Int(i) => fnv(2, &i.to_le_bytes()),
        Value::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e18 => {
            fnv(2, &(*f as i64).to_le_bytes())
        }
        Value::Float(f) => fnv(3, &f.to_bits().to_le_bytes()),
        Value::String(s) => fnv(4, s.as_bytes()),
        Value::Bytes(b) => fnv(5, b),
        Value::Json(j) => fnv(6, j.as_bytes()),
    }
}

/// What happened to one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Added to its pane. `evicted`: another key was evicted to make room for this one.
    /// `distinct_full`: a distinct value was not remembered ([`MAX_DISTINCT_ENTRIES`]).
    Added { evicted: bool, distinct_full: bool },
    /// The watermark already passed its last window's end plus the allowed lateness.
    Late,
    /// Its event time is more than `max_future_ms` ahead of the clock.
    Future,
}

/// A window that closed: its key, bounds and the value of every aggregate (in spec order).
#[derive(Debug, Clone, PartialEq)]
pub struct Closed {
    pub key: Key,
    pub start_ms: i64,
    pub end_ms: i64,
    pub values: Vec<Value>,
}

/// The open panes of one key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct KeyState {
    /// When it was last updated, in [`WindowState::next_touch`] order: the eviction order.
    touched: u64,
    /// Pane start -> one accumulator per aggregate.
    panes: BTreeMap<i64, Vec<Acc>>,
}

/// The state of one window definition.
#[derive(Debug)]
pub struct WindowState {
    spec: Spec,
    /// Largest event time seen or clock reading given; `None` before the first.
    watermark_ms: Option<i64>,
    /// Largest window start already closed (every window starting at or before it is done).
    closed_through_ms: Option<i64>,
    keys: HashMap<Key, KeyState>,
    /// `touched` -> key: the least recently updated key first.
    lru: BTreeMap<u64, Key>,
    next_touch: u64,
    /// Distinct hashes held across all keys and panes.
    n_distinct: usize,
    /// Changed since the last [`WindowState::take_dirty`].
    dirty: bool,
}

/// The state as saved: keys in eviction order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedState {
    watermark_ms: Option<i64>,
    closed_through_ms: Option<i64>,
    keys: Vec<(Key, BTreeMap<i64, Vec<Acc>>)>,
}

impl WindowState {
    pub fn new(spec: Spec) -> WindowState {
        assert!(
            spec.slide_ms > 0 && spec.size_ms % spec.slide_ms == 0,
            "validated config"
        );
        WindowState {
            spec,
            watermark_ms: None,
            closed_through_ms: None,
            keys: HashMap::new(),
            lru: BTreeMap::new(),
            next_touch: 0,
            n_distinct: 0,
            dirty: false,
        }
    }

    pub fn n_keys(&self) -> usize {
        self.keys.len()
    }

    #[cfg(test)]
    pub fn watermark_ms(&self) -> Option<i64> {
        self.watermark_ms
    }

    /// The largest window start that is closed at watermark `watermark_ms`.
    fn closable_through(&self, watermark_ms: i64) -> i64 {
        let limit = watermark_ms
            .saturating_sub(self.spec.size_ms)
            .saturating_sub(self.spec.lateness_ms);
        limit.div_euclid(self.spec.slide_ms) * self.spec.slide_ms
    }

    fn pane_of(&self, time_ms: i64) -> i64 {
        time_ms.div_euclid(self.spec.slide_ms) * self.spec.slide_ms
    }

    /// Moves the watermark to the clock (it never goes back).
    pub fn advance(&mut self, now_ms: i64) {
        if self.watermark_ms.is_none_or(|w| now_ms > w) {
            self.watermark_ms = Some(now_ms);
        }
    }

    /// Adds one event: its time, key and one input per aggregate.
    pub fn add(
        &mut self,
        event_time_ms: i64,
        now_ms: i64,
        key: Key,
        inputs: &[Option<Value>],
    ) -> Outcome {
        debug_assert_eq!(inputs.len(), self.spec.aggregates.len());
        if event_time_ms > now_ms.saturating_add(self.spec.max_future_ms) {
            return Outcome::Future;
        }
        let pane = self.pane_of(event_time_ms);
        // The last window covering the pane starts at the pane; once it is closable the event
        // can change nothing that is still open.
        if let Some(watermark) = self.watermark_ms
            && pane <= self.closable_through(watermark)
        {
            return Outcome::Late;
        }
        let touched = self.next_touch;
        self.next_touch += 1;
        let mut evicted = false;
        match self.keys.get_mut(&key) {
            Some(state) => {
                self.lru.remove(&state.touched);
                state.touched = touched;
            }
            None => {
                if self.keys.len() >= self.spec.max_keys {
                    self.evict_oldest();
                    evicted = true;
                }
                self.keys.insert(
                    key.clone(),
                    KeyState {
                        touched,
                        panes: BTreeMap::new(),
                    },
                );
            }
        }
        self.lru.insert(touched, key.clone());
        let state = self.keys.get_mut(&key).expect("inserted above");
        let aggregates = &self.spec.aggregates;
        let accs = state
            .panes
            .entry(pane)
            .or_insert_with(|| aggregates.iter().map(|a| Acc::new(a.function)).collect());
        let mut room = MAX_DISTINCT_ENTRIES.saturating_sub(self.n_distinct);
        let room_before = room;
        let mut distinct_full = false;
        for ((acc, spec), input) in accs.iter_mut().zip(aggregates).zip(inputs) {
            distinct_full |= acc.add(*spec, input.as_ref(), &mut room);
        }
        self.n_distinct += room_before - room;
        if self.watermark_ms.is_none_or(|w| event_time_ms > w) {
            self.watermark_ms = Some(event_time_ms);
        }
        self.dirty = true;
        Outcome::Added {
            evicted,
            distinct_full,
        }
    }

    fn evict_oldest(&mut self) {
        if let Some((_, key)) = self.lru.pop_first()
            && let Some(state) = self.keys.remove(&key)
        {
            self.forget_distinct(state.panes.values());
        }
    }

    fn forget_distinct<'a>(&mut self, panes: impl Iterator<Item = &'a Vec<Acc>>) {
        let n: usize = panes
            .flat_map(|accs| accs.iter().map(Acc::n_distinct))
            .sum();
        self.n_distinct = self.n_distinct.saturating_sub(n);
    }

    /// Closes every window the watermark has passed (end + lateness); appends them to `out`
    /// in key order, then by start. Windows without any event are not reported.
    pub fn close_due(&mut self, out: &mut Vec<Closed>) {
        let Some(watermark) = self.watermark_ms else {
            return;
        };
        let through = self.closable_through(watermark);
        if self.closed_through_ms.is_some_and(|done| through <= done) {
            return;
        }
        let after = self.closed_through_ms;
        let size = self.spec.size_ms;
        let slide = self.spec.slide_ms;
        let mut emptied = Vec::new();
        let mut forgotten = 0;
        let mut keys: Vec<&Key> = self.keys.keys().collect();
        keys.sort();
        let keys: Vec<Key> = keys.into_iter().cloned().collect();
        for key in keys {
            let state = self.keys.get_mut(&key).expect("listed above");
            // Starts of the windows to close that cover at least one pane of this key.
            let mut starts = BTreeSet::new();
            for &pane in state.panes.keys() {
                let mut start = pane;
                while start > pane.saturating_sub(size) {
                    if start <= through && after.is_none_or(|done| start > done) {
                        starts.insert(start);
                    }
                    start -= slide;
                }
            }
            for start in starts {
                let mut accs: Option<Vec<Acc>> = None;
                for (_, pane) in state.panes.range(start..start.saturating_add(size)) {
                    match &mut accs {
                        None => accs = Some(pane.clone()),
                        Some(accs) => accs.iter_mut().zip(pane).for_each(|(a, b)| a.merge(b)),
                    }
                }
                if let Some(accs) = accs {
                    out.push(Closed {
                        key: key.clone(),
                        start_ms: start,
                        end_ms: start.saturating_add(size),
                        values: accs.iter().map(Acc::value).collect(),
                    });
                }
            }
            // A pane's last window starts at the pane: panes up to `through` are done.
            let kept = state.panes.split_off(&through.saturating_add(1));
            let done = std::mem::replace(&mut state.panes, kept);
            forgotten += done
                .values()
                .flat_map(|accs| accs.iter().map(Acc::n_distinct))
                .sum::<usize>();
            if state.panes.is_empty() {
                emptied.push((key, state.touched));
            }
        }
        self.n_distinct = self.n_distinct.saturating_sub(forgotten);
        for (key, touched) in emptied {
            self.keys.remove(&key);
            self.lru.remove(&touched);
        }
        self.closed_through_ms = Some(through);
        self.dirty = true;
    }

    /// Whether anything changed since the last [`WindowState::take_dirty`].
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Whether anything changed since the last call; clears the mark.
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// Marks the state changed (a save failed: the next one must write).
    pub fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    /// The state to save.
    pub fn save(&self) -> SavedState {
        SavedState {
            watermark_ms: self.watermark_ms,
            closed_through_ms: self.closed_through_ms,
            keys: self
                .lru
                .values()
                .map(|key| (key.clone(), self.keys[key].panes.clone()))
                .collect(),
        }
    }

    /// Restores saved state into an empty state of the same definition. Keys past `max_keys`
    /// (the limit may have shrunk) are evicted, oldest first; returns how many.
    pub fn restore(&mut self, saved: SavedState) -> Result<usize, String> {
        let n_aggregates = self.spec.aggregates.len();
        for (_, panes) in &saved.keys {
            for (&pane, accs) in panes {
                let fits = accs.len() == n_aggregates
                    && accs.iter().zip(&self.spec.aggregates).all(|(acc, spec)| {
                        std::mem::discriminant(acc)
                            == std::mem::discriminant(&Acc::new(spec.function))
                    });
                if !fits || pane.rem_euclid(self.spec.slide_ms) != 0 {
                    return Err("saved panes do not fit this window definition".to_owned());
                }
            }
        }
        self.watermark_ms = saved.watermark_ms;
        self.closed_through_ms = saved.closed_through_ms;
        let n_saved = saved.keys.len();
        let skip = n_saved.saturating_sub(self.spec.max_keys);
        for (key, panes) in saved.keys.into_iter().skip(skip) {
            let touched = self.next_touch;
            self.next_touch += 1;
            self.n_distinct += panes
                .values()
                .flat_map(|accs| accs.iter().map(Acc::n_distinct))
                .sum::<usize>();
            self.lru.insert(touched, key.clone());
            self.keys.insert(key, KeyState { touched, panes });
        }
        Ok(skip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(
        size_ms: i64,
        slide_ms: i64,
        lateness_ms: i64,
        functions: &[AggregateFunction],
    ) -> Spec {
        Spec {
            size_ms,
            slide_ms,
            lateness_ms,
            max_future_ms: 1_000_000,
            max_keys: 100,
            aggregates: functions
                .iter()
                .map(|&function| AggregateSpec {
                    function,
                    counts_events: true,
                })
                .collect(),
        }
    }

    fn key(name: &str) -> Key {
        vec![KeyPart::Str(name.to_owned())]
    }

    fn count_only(size_ms: i64, slide_ms: i64, lateness_ms: i64) -> WindowState {
        WindowState::new(spec(
            size_ms,
            slide_ms,
            lateness_ms,
            &[AggregateFunction::Count],
        ))
    }

    fn add(state: &mut WindowState, time_ms: i64, name: &str) -> Outcome {
        state.add(time_ms, time_ms, key(name), &[None])
    }

    fn closed(state: &mut WindowState, now_ms: i64) -> Vec<(String, i64, i64, Value)> {
        state.advance(now_ms);
        let mut out = Vec::new();
        state.close_due(&mut out);
        out.into_iter()
            .map(|c| {
                let KeyPart::Str(name) = &c.key[0] else {
                    panic!("string keys")
                };
                (name.clone(), c.start_ms, c.end_ms, c.values[0].clone())
            })
            .collect()
    }

    #[test]
    fn tumbling_windows_close_at_their_end() {
        let mut state = count_only(1000, 1000, 0);
        for t in [0, 10, 999] {
            assert!(matches!(add(&mut state, t, "a"), Outcome::Added { .. }));
        }
        assert!(matches!(add(&mut state, 500, "b"), Outcome::Added { .. }));
        assert_eq!(closed(&mut state, 999), vec![]);
        assert_eq!(
            closed(&mut state, 1000),
            vec![
                ("a".into(), 0, 1000, Value::Int(3)),
                ("b".into(), 0, 1000, Value::Int(1)),
            ]
        );
        assert_eq!(state.n_keys(), 0, "closed keys are forgotten");
        assert_eq!(closed(&mut state, 5000), vec![], "each window closes once");
    }

    #[test]
    fn an_event_past_the_end_closes_the_window_on_event_time() {
        let mut state = count_only(1000, 1000, 0);
        add(&mut state, 100, "a");
        add(&mut state, 1000, "a");
        let mut out = Vec::new();
        state.close_due(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].start_ms, out[0].values[0].clone()),
            (0, Value::Int(1))
        );
        assert_eq!(add(&mut state, 999, "a"), Outcome::Late);
    }

    #[test]
    fn allowed_lateness_keeps_a_window_open_past_its_end() {
        let mut state = count_only(1000, 1000, 500);
        add(&mut state, 100, "a");
        add(&mut state, 1200, "a");
        assert_eq!(closed(&mut state, 1499), vec![]);
        assert!(
            matches!(
                state.add(900, 1499, key("a"), &[None]),
                Outcome::Added { .. }
            ),
            "499 ms after the end, within 500 ms of lateness"
        );
        assert_eq!(
            closed(&mut state, 1500),
            vec![("a".into(), 0, 1000, Value::Int(2))]
        );
        assert_eq!(state.add(999, 1500, key("a"), &[None]), Outcome::Late);
        assert!(
            matches!(
                state.add(1000, 1500, key("a"), &[None]),
                Outcome::Added { .. }
            ),
            "the next window is open"
        );
        assert_eq!(
            closed(&mut state, 2500),
            vec![("a".into(), 1000, 2000, Value::Int(2))]
        );
    }

    #[test]
    fn events_too_far_ahead_of_the_clock_are_left_out() {
        let mut state = count_only(1000, 1000, 0);
        let mut spec = state.spec.clone();
        spec.max_future_ms = 100;
        state = WindowState::new(spec);
        assert_eq!(state.add(1101, 1000, key("a"), &[None]), Outcome::Future);
        assert_eq!(state.watermark_ms(), None, "it does not move the watermark");
        assert!(matches!(
            state.add(1100, 1000, key("a"), &[None]),
            Outcome::Added { .. }
        ));
    }

    #[test]
    fn sliding_windows_are_hopping_windows() {
        // size 3 s, a new window every second: an event is in three windows.
        let mut state = count_only(3000, 1000, 0);
        add(&mut state, 500, "a"); // windows starting -2000, -1000, 0
        add(&mut state, 1500, "a"); // -1000, 0, 1000
        add(&mut state, 2500, "a"); // 0, 1000, 2000
        assert_eq!(
            closed(&mut state, 2999),
            vec![
                ("a".into(), -2000, 1000, Value::Int(1)),
                ("a".into(), -1000, 2000, Value::Int(2)),
            ]
        );
        assert_eq!(
            closed(&mut state, 3000),
            vec![("a".into(), 0, 3000, Value::Int(3))]
        );
        assert_eq!(
            closed(&mut state, 10_000),
            vec![
                ("a".into(), 1000, 4000, Value::Int(2)),
                ("a".into(), 2000, 5000, Value::Int(1)),
            ]
        );
        assert_eq!(state.n_keys(), 0);
    }

    #[test]
    fn a_late_event_in_a_sliding_window_still_counts_where_it_can() {
        let mut state = count_only(2000, 1000, 0);
        add(&mut state, 100, "a");
        // Watermark 2000: the window [0, 2000) closes; [1000, 3000) is open, and pane 1000
        // belongs to it, but pane 0 belongs to no open window.
        assert_eq!(
            closed(&mut state, 2000),
            vec![
                ("a".into(), -1000, 1000, Value::Int(1)),
                ("a".into(), 0, 2000, Value::Int(1)),
            ]
        );
        assert_eq!(state.add(999, 2000, key("a"), &[None]), Outcome::Late);
        assert!(matches!(
            state.add(1000, 2000, key("a"), &[None]),
            Outcome::Added { .. }
        ));
        assert_eq!(
            closed(&mut state, 3000),
            vec![("a".into(), 1000, 3000, Value::Int(1))]
        );
    }

    #[test]
    fn the_key_updated_longest_ago_is_evicted_first() {
        let mut state = count_only(1000, 1000, 0);
        let mut spec = state.spec.clone();
        spec.max_keys = 2;
        state = WindowState::new(spec);
        assert_eq!(
            add(&mut state, 1, "a"),
            Outcome::Added {
                evicted: false,
                distinct_full: false
            }
        );
        add(&mut state, 2, "b");
        add(&mut state, 3, "a"); // b is now the oldest
        assert_eq!(
            add(&mut state, 4, "c"),
            Outcome::Added {
                evicted: true,
                distinct_full: false
            }
        );
        assert_eq!(state.n_keys(), 2);
        assert_eq!(
            closed(&mut state, 1000),
            vec![
                ("a".into(), 0, 1000, Value::Int(2)),
                ("c".into(), 0, 1000, Value::Int(1)),
            ]
        );
    }

    #[test]
    fn aggregates_over_numbers_and_distinct_values() {
        use AggregateFunction::*;
        let mut state =
            WindowState::new(spec(1000, 1000, 0, &[Count, Sum, Avg, Min, Max, Distinct]));
        let mut add_value = |t: i64, value: Value| {
            let inputs = vec![Some(value.clone()); 6];
            state.add(t, t, key("k"), &inputs);
        };
        add_value(1, Value::Int(4));
        add_value(2, Value::Float(2.0)); // distinct: the same value as Int(2)
        add_value(3, Value::Int(2));
        add_value(4, Value::String("x".into())); // counted and distinct, not a number
        add_value(5, Value::Null); // counted (count has no argument), nothing else
        let mut out = Vec::new();
        state.advance(1000);
        state.close_due(&mut out);
        assert_eq!(
            out[0].values,
            vec![
                Value::Int(5),
                Value::Float(8.0),
                Value::Float(8.0 / 3.0),
                Value::Float(2.0),
                Value::Int(4),
                Value::Int(3),
            ]
        );
    }

    #[test]
    fn integer_sums_stay_integers_and_count_of_a_field_skips_absent_values() {
        use AggregateFunction::*;
        let mut spec = spec(1000, 1000, 0, &[Count, Sum, Min]);
        spec.aggregates[0].counts_events = false;
        let mut state = WindowState::new(spec);
        state.add(
            1,
            1,
            key("k"),
            &[Some(Value::Int(1)), Some(Value::Int(5)), None],
        );
        state.add(2, 2, key("k"), &[None, Some(Value::Int(7)), None]);
        state.add(3, 3, key("k"), &[Some(Value::Null), None, None]);
        let mut out = Vec::new();
        state.advance(1000);
        state.close_due(&mut out);
        assert_eq!(
            out[0].values,
            vec![Value::Int(1), Value::Int(12), Value::Null]
        );
    }

    #[test]
    fn distinct_values_past_the_bound_are_not_remembered() {
        let mut state = WindowState::new(spec(1000, 1000, 0, &[AggregateFunction::Distinct]));
        state.n_distinct = MAX_DISTINCT_ENTRIES - 1;
        let first = state.add(1, 1, key("k"), &[Some(Value::Int(1))]);
        assert_eq!(
            first,
            Outcome::Added {
                evicted: false,
                distinct_full: false
            }
        );
        let second = state.add(2, 2, key("k"), &[Some(Value::Int(2))]);
        assert_eq!(
            second,
            Outcome::Added {
                evicted: false,
                distinct_full: true
            }
        );
        let again = state.add(3, 3, key("k"), &[Some(Value::Int(1))]);
        assert!(matches!(
            again,
            Outcome::Added {
                distinct_full: false,
                ..
            }
        ));
        let mut out = Vec::new();
        state.advance(1000);
        state.close_due(&mut out);
        assert_eq!(out[0].values, vec![Value::Int(1)]);
        assert_eq!(
            state.n_distinct,
            MAX_DISTINCT_ENTRIES - 1,
            "the pane's hash is given back"
        );
    }

    #[test]
    fn saved_state_restores_the_same_windows() {
        let mut state = count_only(3000, 1000, 0);
        add(&mut state, 500, "a");
        add(&mut state, 1500, "b");
        add(&mut state, 1600, "a");
        let saved = state.save();
        let bytes = postcard::to_stdvec(&saved).expect("encode");
        let decoded: SavedState = postcard::from_bytes(&bytes).expect("decode");
        assert_eq!(decoded, saved);
        let mut restored = count_only(3000, 1000, 0);
        assert_eq!(restored.restore(decoded), Ok(0));
        assert_eq!(closed(&mut restored, 100_000), closed(&mut state, 100_000));
    }

    #[test]
    fn restoring_into_a_smaller_limit_keeps_the_newest_keys() {
        let mut state = count_only(1000, 1000, 0);
        add(&mut state, 1, "a");
        add(&mut state, 2, "b");
        add(&mut state, 3, "c");
        let mut small = count_only(1000, 1000, 0);
        small.spec.max_keys = 2;
        assert_eq!(small.restore(state.save()), Ok(1));
        let names: Vec<String> = closed(&mut small, 1000).into_iter().map(|c| c.0).collect();
        assert_eq!(names, ["b", "c"]);
    }

    #[test]
    fn saved_state_of_other_aggregates_is_refused() {
        let mut state = count_only(1000, 1000, 0);
        add(&mut state, 1, "a");
        let mut other = WindowState::new(spec(1000, 1000, 0, &[AggregateFunction::Sum]));
        assert!(other.restore(state.save()).is_err());
        assert_eq!(other.n_keys(), 0);
    }
}
