//! Snowplow tracker protocol bodies: `payload_data` envelopes of `pv` and `se` events as the
//! JavaScript tracker sends them to `POST /com.snowplowanalytics.snowplow/tp2` (every value a
//! string; a `cx` context, base64url without padding as the tracker encodes it).
//!
//! Pure apart from the clock passed in: the same seed gives the same bodies.

use std::fmt::Write as _;

use super::load::Body;

pub const TP2_PATH: &str = "/com.snowplowanalytics.snowplow/tp2";

const PAYLOAD_DATA_SCHEMA: &str =
    "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4";
const CONTEXTS_SCHEMA: &str = "iglu:com.snowplowanalytics.snowplow/contexts/jsonschema/1-0-0";
const WEB_PAGE_SCHEMA: &str = "iglu:com.snowplowanalytics.snowplow/web_page/jsonschema/1-0-0";

const PAGES: [(&str, &str); 6] = [
    ("", "Home | Example Shop"),
    ("shoes", "Shoes | Example Shop"),
    ("jackets", "Jackets | Example Shop"),
    ("cart", "Your cart | Example Shop"),
    ("search", "Search | Example Shop"),
    ("checkout", "Checkout | Example Shop"),
];
const CATEGORIES: [&str; 4] = ["navigation", "product", "cart", "video"];
const ACTIONS: [&str; 4] = ["click", "add", "play", "scroll"];
const REFERRERS: [&str; 3] = ["https://www.google.com/", "https://shop.example.com/", ""];
const RESOLUTIONS: [&str; 4] = ["1920x1080", "2560x1440", "390x844", "1440x900"];
const N_USERS: u64 = 20_000;

/// Bodies of `events_per_request` events each, `n_events` in all. `pv` (70%) and `se` items
/// with `e`, `p`, `tv`, `eid`, `duid`, `sid`, `vid`, `url`, `refr`, `page`, `dtm`, `stm`, the
/// usual browser fields and a `cx` web_page context.
pub fn bodies(
    n_events: usize,
    events_per_request: usize,
    seed: u64,
    now_unix_ms: i64,
) -> Vec<Body> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut out = Vec::new();
    let mut remaining = n_events;
    while remaining > 0 {
        let n = events_per_request.min(remaining);
        remaining -= n;
        let sent_ms = now_unix_ms - rng.i64(0..1_000);
        let mut json = String::with_capacity(n * 900);
        let _ = write!(json, "{{\"schema\":\"{PAYLOAD_DATA_SCHEMA}\",\"data\":[");
        for idx in 0..n {
            if idx > 0 {
                json.push(',');
            }
            item(&mut json, &mut rng, sent_ms);
        }
        json.push_str("]}");
        out.push(Body { json, n_events: n });
    }
    out
}

fn item(json: &mut String, rng: &mut fastrand::Rng, sent_ms: i64) {
    let user = rng.u64(0..N_USERS);
    let mut user_rng = fastrand::Rng::with_seed(user);
    let duid = uuid_v4(&mut user_rng);
    let sid = uuid_v4(&mut fastrand::Rng::with_seed(user * 7 + rng.u64(0..3)));
    let (path, title) = PAGES[rng.usize(0..PAGES.len())];
    let url = format!("https://shop.example.com/{path}");
    let created_ms = sent_ms - rng.i64(0..3_000);
    let page_view_id = uuid_v4(rng);
    let event_type = if rng.u32(0..10) < 7 { "pv" } else { "se" };
    let context = format!(
        "{{\"schema\":\"{CONTEXTS_SCHEMA}\",\"data\":[{{\"schema\":\"{WEB_PAGE_SCHEMA}\",\"data\":{{\"id\":\"{page_view_id}\"}}}}]}}"
    );
    let _ = write!(
        json,
        "{{\"e\":\"{}\",\"p\":\"web\",\"tv\":\"js-3.24.2\",\"tna\":\"sp1\",\"aid\":\"shop\",\
         \"eid\":\"{}\",\"duid\":\"{duid}\",\"sid\":\"{sid}\",\"vid\":\"{}\",\"url\":\"{url}\",\
         \"refr\":\"{}\",\"page\":\"{title}\",\"dtm\":\"{created_ms}\",\"stm\":\"{sent_ms}\",\
         \"lang\":\"en-GB\",\"cookie\":\"1\",\"cs\":\"UTF-8\",\"tz\":\"Europe/Berlin\",\"res\":\"{}\",\
         \"cd\":\"24\",\"vp\":\"1280x720\",\"ds\":\"1280x3400\"",
        event_type,
        uuid_v4(rng),
        rng.u32(1..40),
        REFERRERS[rng.usize(0..REFERRERS.len())],
        RESOLUTIONS[(user % RESOLUTIONS.len() as u64) as usize],
    );
    if event_type == "se" {
        let _ = write!(
            json,
            ",\"se_ca\":\"{}\",\"se_ac\":\"{}\",\"se_la\":\"sku-{:05}\",\"se_va\":\"{}\"",
            CATEGORIES[rng.usize(0..CATEGORIES.len())],
            ACTIONS[rng.usize(0..ACTIONS.len())],
            rng.u32(0..5_000),
            rng.u32(1..200),
        );
    }
    let _ = write!(json, ",\"cx\":\"{}\"}}", base64url(context.as_bytes()));
}

fn uuid_v4(rng: &mut fastrand::Rng) -> String {
    let hex = format!("{:032x}", rng.u128(..));
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

/// Base64url without padding (RFC 4648 §5), as the JavaScript tracker encodes `cx`.
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let n_chars = chunk.len() + 1;
        for idx in 0..n_chars {
            out.push(ALPHABET[((n >> (18 - 6 * idx)) & 63) as usize] as char);
        }
    }
    out
}
