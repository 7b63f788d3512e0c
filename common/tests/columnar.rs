//! The column-wise batch layout: exact round trips for any events, refusal of hostile payloads
//! without panics or unbounded allocation, and the size it is for.

use std::collections::BTreeMap;

use proptest::prelude::*;
use runnel_common::batch::{self, BatchError};
use runnel_common::columnar::Layout;
use runnel_common::wire::{Batch, Compression};
use runnel_common::{Event, SourceKind, Value};

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        // Plain text, including empty strings and non-ASCII.
        "[a-zA-Z0-9 _./é-]{0,24}",
        // Canonical UUIDs (travel as 16 bytes) and near misses (upper case, no dashes).
        "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
        "[0-9A-F]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
        // Hex ids (travel as bytes) and near misses (odd length, upper case, short).
        "[0-9a-f]{8,40}",
        "[0-9a-fA-F]{1,12}",
        // Version-4 UUIDs (15.25 bytes in the second layout).
        "[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
        // A few stems and trailing numbers, zero-padded and longer than a u64.
        (
            prop::sample::select(vec!["u-", "p-0", "", "x9é"]),
            "[0-9]{0,24}"
        )
            .prop_map(|(stem, digits)| format!("{stem}{digits}")),
        // A few repeated values, so dictionaries hold repeats.
        prop::sample::select(vec!["page_view", "clickstream", "u-000001", ""])
            .prop_map(str::to_owned),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        (-1000i64..1000).prop_map(Value::Int),
        any::<f64>()
            .prop_filter("NaN != NaN", |f| !f.is_nan())
            .prop_map(Value::Float),
        text().prop_map(Value::String),
        prop::collection::vec(any::<u8>(), 0..8).prop_map(Value::Bytes),
        text().prop_map(Value::Json),
    ]
}

fn source() -> impl Strategy<Value = SourceKind> {
    prop::sample::select(vec![
        SourceKind::Http,
        SourceKind::Snowplow,
        SourceKind::Segment,
        SourceKind::Mqtt,
        SourceKind::Internal,
    ])
}

fn event() -> impl Strategy<Value = Event> {
    (
        (any::<i64>(), any::<i64>(), source(), text(), text()),
        (
            prop::option::of(text()),
            prop::option::of(text()),
            prop::option::of(text()),
            prop::option::of(any::<f64>().prop_filter("NaN != NaN", |f| !f.is_nan())),
        ),
        prop::collection::vec(text(), 0..3),
        prop::collection::btree_map(
            prop::sample::select(vec!["url", "price", "qty", "ua", "x"]).prop_map(str::to_owned),
            value(),
            0..5,
        ),
    )
        .prop_map(
            |(
                (event_time_ms, receive_time_ms, source, stream, name),
                (event_id, user_id, session_id, score),
                tags,
                attrs,
            )| Event {
                seq: 0,
                event_time_ms,
                receive_time_ms,
                source,
                stream,
                name,
                event_id,
                user_id,
                session_id,
                score,
                tags,
                attrs,
            },
        )
}

/// Events with strictly increasing sequence numbers after `after_seq` (gaps allowed).
fn events() -> impl Strategy<Value = (u64, Vec<Event>)> {
    (
        0u64..u64::MAX / 2,
        prop::collection::vec((1u64..1000, event()), 1..40),
    )
        .prop_map(|(after_seq, rows)| {
            let mut seq = after_seq;
            let events = rows
                .into_iter()
                .map(|(gap, mut event)| {
                    seq += gap;
                    event.seq = seq;
                    event
                })
                .collect();
            (after_seq, events)
        })
}

fn layout() -> impl Strategy<Value = Layout> {
    prop::sample::select(vec![Layout::V1, Layout::V2])
}

fn compression_of(layout: Layout) -> Compression {
    match layout {
        Layout::V1 => Compression::ZstdColumns,
        Layout::V2 => Compression::ZstdColumns2,
    }
}

proptest! {
    #[test]
    fn column_batches_round_trip_exactly(layout in layout(), (after_seq, events) in events()) {
        let batch = batch::encode_columns(layout, after_seq, &events).unwrap();
        prop_assert_eq!(batch.compression, compression_of(layout));
        prop_assert_eq!(batch.after_seq, after_seq);
        prop_assert_eq!(batch.last_seq, events.last().unwrap().seq);
        prop_assert_eq!(batch::decode(&batch).unwrap(), events);
    }

    #[test]
    fn arbitrary_column_payloads_never_panic(
        layout in layout(),
        payload in prop::collection::vec(any::<u8>(), 0..512),
        n_events in 1u32..20,
    ) {
        let raw = zstd::bulk::compress(&payload, 1).unwrap();
        let batch = Batch {
            after_seq: 0,
            last_seq: u64::from(n_events),
            n_events,
            uncompressed_bytes: payload.len() as u32,
            compression: compression_of(layout),
            payload: raw,
        };
        let _ = batch::decode(&batch);
    }

    #[test]
    fn corrupted_column_batches_never_panic(
        layout in layout(),
        (after_seq, events) in events(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let batch = batch::encode_columns(layout, after_seq, &events).unwrap();
        let mut raw = zstd::bulk::decompress(&batch.payload, batch.uncompressed_bytes as usize).unwrap();
        for (at, byte) in flips {
            let idx = at.index(raw.len());
            raw[idx] ^= byte | 1;
        }
        let corrupted = Batch {
            uncompressed_bytes: raw.len() as u32,
            payload: zstd::bulk::compress(&raw, 1).unwrap(),
            ..batch
        };
        // Refused, or decoded into events that pass every batch check: never a panic.
        let _ = batch::decode(&corrupted);
    }
}

/// A tiny payload whose dictionary references one long string from every event must be
/// refused before the events are built, not expanded to gigabytes.
#[test]
fn a_dictionary_bomb_is_refused() {
    let long = "x".repeat(60_000);
    let events: Vec<Event> = (1..=1000u64)
        .map(|seq| {
            let mut event = Event::new(SourceKind::Http, "s", "n", 0);
            event.seq = seq;
            event
                .attrs
                .insert("k".to_owned(), Value::String(long.clone()));
            event
        })
        .collect();
    // 1000 × 60 kB = 60 MB of events, well over the 16 MiB batch limit, in a payload of a few
    // kilobytes: the row layout could never carry it, the column layouts must refuse it.
    for layout in [Layout::V1, Layout::V2] {
        let batch = batch::encode_columns(layout, 0, &events).unwrap();
        assert!(
            batch.uncompressed_bytes < 100_000,
            "{layout:?}: {}",
            batch.uncompressed_bytes
        );
        match batch::decode(&batch) {
            Err(BatchError::Decode(message)) => {
                assert!(message.contains("more than"), "{layout:?}: {message}");
            }
            other => panic!("{layout:?}: expected a refusal, got {other:?}"),
        }
    }
}

/// Clickstream-like events (UUID ids, hex session ids, a few repeated names, URLs and user
/// agents) compress to well under the row layout: what the layout is for.
#[test]
fn clickstream_batches_are_smaller_than_row_batches() {
    let mut rng_state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state
    };
    let names = ["page_view", "product_view", "add_to_cart", "search"];
    let agents = [
        "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
        "Mozilla/5.0 (iPad; CPU OS 18_1 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    ];
    let events: Vec<Event> = (1..=1000u64)
        .map(|seq| {
            let a = next();
            let b = next();
            let mut event = Event::new(
                SourceKind::Http,
                "clickstream",
                names[(a % 4) as usize],
                1_764_000_000_000 + (seq as i64) * 7 + (b % 50) as i64,
            );
            event.seq = seq;
            event.event_id = Some(format!(
                "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
                a >> 32,
                a & 0xffff,
                b & 0xfff,
                (b >> 12) & 0xfff,
                b >> 16
            ));
            event.user_id = Some(format!("u-{:06}", a % 20_000));
            event.session_id = Some(format!("{:016x}", (a % 20_000) * 0x9e37_79b9));
            let mut attrs = BTreeMap::new();
            attrs.insert(
                "url".to_owned(),
                Value::String(format!("https://shop.example.com/shoes/p-{:05}", b % 5000)),
            );
            attrs.insert(
                "user_agent".to_owned(),
                Value::String(agents[(a % 2) as usize].to_owned()),
            );
            event.attrs = attrs;
            event
        })
        .collect();
    let rows = batch::encode(0, &events).unwrap();
    let columns = batch::encode_columns(Layout::V1, 0, &events).unwrap();
    let columns2 = batch::encode_columns(Layout::V2, 0, &events).unwrap();
    assert_eq!(batch::decode(&columns).unwrap(), events);
    assert_eq!(batch::decode(&columns2).unwrap(), events);
    eprintln!(
        "1000 clickstream events: {} bytes in the second column layout, {} in the first, {} \
         row-wise",
        columns2.payload.len(),
        columns.payload.len(),
        rows.payload.len()
    );
    assert!(
        columns.payload.len() * 10 < rows.payload.len() * 8,
        "columns {} bytes, rows {} bytes",
        columns.payload.len(),
        rows.payload.len()
    );
    // Ids that are all new in the batch cost their bytes alone in the second layout.
    assert!(
        columns2.payload.len() * 100 < columns.payload.len() * 95,
        "second layout {} bytes, first {} bytes",
        columns2.payload.len(),
        columns.payload.len()
    );
}
