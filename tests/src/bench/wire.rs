//! `runnel-bench wire`: where the bytes of a column-wise batch go, without a network. The
//! benchmark's clickstream events (`events.rs`), decoded by the agent's JSON decoder, are encoded
//! as the agent ships them (`runnel_common::batch::encode_columns`, postcard then zstd) in
//! batches of the given sizes, in both column layouts; then again in the current layout with one
//! field removed from every event, so each field's share of the payload shows as the bytes its
//! removal saves. The full HTTP benchmark
//! measures the same payload on the wire, plus QUIC framing and acks.
//!
//! It measures, never asserts.

use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use runnel_common::Event;
use runnel_common::columnar::Layout;

use crate::events;

/// `runnel-bench wire`: payload bytes per event and each field's share.
#[derive(Debug, Parser)]
#[command(name = "runnel-bench wire")]
struct Args {
    /// Events per batch, comma-separated (the agent's default `uplink.max_batch_events` is
    /// 1000).
    #[arg(long, value_delimiter = ',', default_values_t = [1000, 4000])]
    batch_sizes: Vec<usize>,
    /// Events encoded per batch size.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Seed of the event generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// A field taken out of every event, to see what it costs.
struct Removal {
    name: &'static str,
    apply: fn(&mut Event),
}

const REMOVALS: [Removal; 10] = [
    Removal {
        name: "event_id",
        apply: |e| e.event_id = None,
    },
    Removal {
        name: "session_id",
        apply: |e| e.session_id = None,
    },
    Removal {
        name: "user_id",
        apply: |e| e.user_id = None,
    },
    Removal {
        name: "event and receive time",
        apply: |e| {
            e.event_time_ms = 0;
            e.receive_time_ms = 0;
        },
    },
    Removal {
        name: "attrs.url",
        apply: |e| {
            e.attrs.remove("url");
        },
    },
    Removal {
        name: "attrs.referrer",
        apply: |e| {
            e.attrs.remove("referrer");
        },
    },
    Removal {
        name: "attrs.user_agent",
        apply: |e| {
            e.attrs.remove("user_agent");
        },
    },
    Removal {
        name: "attrs.price, currency, quantity",
        apply: |e| {
            for key in ["price", "currency", "quantity"] {
                e.attrs.remove(key);
            }
        },
    },
    Removal {
        name: "attrs.query",
        apply: |e| {
            e.attrs.remove("query");
        },
    },
    Removal {
        name: "name and stream",
        apply: |e| {
            e.name.clear();
            e.stream.clear();
        },
    },
];

/// Entry point: `args` starts with "wire".
pub fn main(args: impl Iterator<Item = String>) -> ExitCode {
    let args = Args::parse_from(args);
    match run(&args) {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("runnel-bench wire: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<String> {
    // A fixed clock: the sizes must not depend on when the bench runs.
    let anchor = 1_764_000_000_000i64;
    let json = events::generate(args.events, args.seed, anchor);
    let json_bytes = json.iter().map(String::len).sum::<usize>() as f64 / json.len() as f64;
    let body = format!("[{}]", json.join(","));
    let mut decoded = runnel_agent::decode::json::decode(body.as_bytes(), anchor, "clickstream")
        .map_err(|error| anyhow::anyhow!("decode the generated events: {error}"))?;
    for (idx, event) in decoded.iter_mut().enumerate() {
        event.seq = idx as u64 + 1;
        event.receive_time_ms = anchor;
    }
    let mut report = String::new();
    writeln!(
        report,
        "{} events, {json_bytes:.1} bytes of JSON each (seed {})\n",
        decoded.len(),
        args.seed
    )?;
    write!(report, "| |")?;
    for size in &args.batch_sizes {
        write!(report, " batch {size}: bytes/event |")?;
    }
    writeln!(report)?;
    writeln!(report, "|---|{}", "---:|".repeat(args.batch_sizes.len()))?;
    let first: Vec<f64> = args
        .batch_sizes
        .iter()
        .map(|&size| payload_per_event(&decoded, Layout::V1, size, None))
        .collect::<anyhow::Result<_>>()?;
    let all: Vec<f64> = args
        .batch_sizes
        .iter()
        .map(|&size| payload_per_event(&decoded, Layout::V2, size, None))
        .collect::<anyhow::Result<_>>()?;
    for (label, payloads) in [
        ("payload, first column layout (protocol 2)", &first),
        ("**payload, second column layout (protocol 3)**", &all),
    ] {
        write!(report, "| {label} |")?;
        for bytes in payloads {
            write!(
                report,
                " {bytes:.2} ({:.1}% of JSON) |",
                100.0 * bytes / json_bytes
            )?;
        }
        writeln!(report)?;
    }
    for removal in &REMOVALS {
        write!(report, "| share of {} |", removal.name)?;
        for (&size, bytes) in args.batch_sizes.iter().zip(&all) {
            let without = payload_per_event(&decoded, Layout::V2, size, Some(removal.apply))?;
            write!(report, " {:.2} |", bytes - without)?;
        }
        writeln!(report)?;
    }
    Ok(report)
}

/// Compressed payload bytes per event, in batches of `size`.
fn payload_per_event(
    events: &[Event],
    layout: Layout,
    size: usize,
    removal: Option<fn(&mut Event)>,
) -> anyhow::Result<f64> {
    let mut total = 0usize;
    for chunk in events.chunks(size) {
        let mut chunk = chunk.to_vec();
        if let Some(remove) = removal {
            chunk.iter_mut().for_each(remove);
        }
        let after_seq = chunk[0].seq - 1;
        let batch = runnel_common::batch::encode_columns(layout, after_seq, &chunk)
            .context("encode a column-wise batch")?;
        total += batch.payload.len();
    }
    Ok(total as f64 / events.len() as f64)
}
