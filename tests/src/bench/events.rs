//! Clickstream-like test events: ~300 bytes of JSON each, shaped like what a web shop's tracker
//! sends (page views, product views, carts, checkouts) with the repetition real traffic has
//! (a catalogue of products, a few user agents and referrers) and the randomness it has too
//! (UUID event ids, session ids). The wire-size ratio depends on this mix, so it is deliberately
//! not a repeated constant string.
//!
//! Pure apart from the clock passed in: the same seed gives the same events.

use std::fmt::Write as _;

const EVENT_NAMES: [(&str, u32); 6] = [
    // (name, weight): most traffic is page and product views.
    ("page_view", 50),
    ("product_view", 25),
    ("add_to_cart", 10),
    ("search", 8),
    ("begin_checkout", 4),
    ("purchase", 3),
];

const USER_AGENTS: [&str; 6] = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPad; CPU OS 18_1 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Safari/605.1.15",
    "Mozilla/5.0 (Android 14; Mobile; rv:133.0) Gecko/133.0 Firefox/133.0",
    "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:133.0) Gecko/20100101 Firefox/133.0",
];

const REFERRERS: [&str; 6] = [
    "https://www.google.com/",
    "https://www.bing.com/",
    "https://shop.example.com/",
    "https://shop.example.com/cart",
    "https://newsletter.example.com/2026-01",
    "",
];

const CATEGORIES: [&str; 8] = [
    "shoes", "jackets", "shirts", "bags", "watches", "outdoor", "kids", "sale",
];

/// Distinct users the events are spread over.
const N_USERS: u64 = 20_000;
/// Distinct products in the catalogue.
const N_PRODUCTS: u64 = 5_000;

/// Generates `n_events` JSON objects (one string each). `now_unix_ms` anchors the timestamps:
/// event times lie in the few seconds before it, as with a live tracker.
pub fn generate(n_events: usize, seed: u64, now_unix_ms: i64) -> Vec<String> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let total_weight: u32 = EVENT_NAMES.iter().map(|(_, w)| w).sum();
    let mut out = Vec::with_capacity(n_events);
    for _ in 0..n_events {
        let mut pick = rng.u32(0..total_weight);
        let mut name = EVENT_NAMES[0].0;
        for (candidate, weight) in EVENT_NAMES {
            if pick < weight {
                name = candidate;
                break;
            }
            pick -= weight;
        }
        let user = rng.u64(0..N_USERS);
        // Sessions: a user has a few; the id is random-looking like real session cookies.
        let session = fastrand::Rng::with_seed(user * 31 + rng.u64(0..3)).u64(..);
        let product = rng.u64(0..N_PRODUCTS);
        let category = CATEGORIES[(product % CATEGORIES.len() as u64) as usize];
        let event_time_ms = now_unix_ms - rng.i64(0..5_000);
        let mut json = String::with_capacity(384);
        let _ = write!(
            json,
            "{{\"event_id\":\"{}\",\"name\":\"{name}\",\"user_id\":\"u-{user:06}\",\"session_id\":\"{session:016x}\",\"timestamp\":\"{}\",",
            uuid_v4(&mut rng),
            rfc3339_ms(event_time_ms),
        );
        let _ = write!(
            json,
            "\"url\":\"https://shop.example.com/{category}/p-{product:05}\",\"referrer\":\"{}\",\"user_agent\":\"{}\"",
            REFERRERS[rng.usize(0..REFERRERS.len())],
            USER_AGENTS[(user % USER_AGENTS.len() as u64) as usize],
        );
        match name {
            "add_to_cart" | "purchase" | "begin_checkout" => {
                let _ = write!(
                    json,
                    ",\"price\":{}.{:02},\"currency\":\"EUR\",\"quantity\":{}",
                    rng.u32(5..400),
                    rng.u32(0..100),
                    rng.u32(1..4)
                );
            }
            "search" => {
                let _ = write!(json, ",\"query\":\"{category} size {}\"", rng.u32(36..46));
            }
            _ => {}
        }
        json.push('}');
        out.push(json);
    }
    out
}

fn uuid_v4(rng: &mut fastrand::Rng) -> String {
    let a = rng.u128(..);
    let hex = format!("{a:032x}");
    format!(
        "{}-{}-4{}-{}{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        ["8", "9", "a", "b"][rng.usize(0..4)],
        &hex[17..20],
        &hex[20..32]
    )
}

/// `2026-01-31T12:00:00.123Z` for Unix milliseconds (proleptic Gregorian, UTC).
pub fn rfc3339_ms(unix_ms: i64) -> String {
    let days = unix_ms.div_euclid(86_400_000);
    let ms_of_day = unix_ms.rem_euclid(86_400_000);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        ms_of_day / 3_600_000,
        ms_of_day / 60_000 % 60,
        ms_of_day / 1000 % 60,
        ms_of_day % 1000
    )
}
