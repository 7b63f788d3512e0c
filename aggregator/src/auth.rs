//! Who may use the query listener's doors: the `[[query.users]]` credentials, checked in one
//! place for every door.
//!
//! [`Credentials`] answers HTTP basic auth for the SQL API (`/api/v1/query`) and the fleet API
//! (`/api/v1/config`, rollouts, agents). Passwords are kept only as HMAC-SHA-256 tags of
//! `name:password` under a key drawn at start, and a presented pair is compared with *ring*'s
//! `hmac::verify`, which is constant time, against every user's tag, so the time taken depends
//! neither on how much of a password matched nor on which user it matched. [`ScramUsers`] holds
//! the salted passwords the PostgreSQL protocol's SCRAM-SHA-256 exchange verifies against;
//! that exchange (and its comparison of the client's proof) runs in the pgwire crate.
//!
//! No users configured means no credentials asked: config allows that only on loopback. This
//! module owns no listener and builds no response: a door decides what a refusal looks like.

use std::collections::HashMap;
use std::fmt::Debug;

use async_trait::async_trait;
use axum::http::{HeaderMap, header};
use base64::Engine as _;
use datafusion_postgres::pgwire::api::auth::sasl::scram::gen_salted_password;
use datafusion_postgres::pgwire::api::auth::{AuthSource, LoginInfo, Password};
use datafusion_postgres::pgwire::error::{PgWireError, PgWireResult};
use ring::hmac;
use runnel_config::QueryUser;

/// SCRAM iterations (RFC 7677's minimum, PostgreSQL's default).
pub const SCRAM_ITERATIONS: usize = 4096;

/// The configured users for HTTP basic auth.
#[derive(Clone)]
pub struct Credentials {
    /// Drawn at start; never leaves the process.
    key: hmac::Key,
    /// HMAC of `name:password` per user; empty: no credentials asked.
    tags: Vec<hmac::Tag>,
}

impl Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("n_users", &self.tags.len())
            .finish_non_exhaustive()
    }
}

impl Credentials {
    pub fn new(users: &[QueryUser]) -> Credentials {
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &ring::rand::SystemRandom::new())
            .expect("the system random source works");
        let tags = users
            .iter()
            .map(|user| hmac::sign(&key, pair(&user.name, &user.password).as_bytes()))
            .collect();
        Credentials { key, tags }
    }

    /// No users configured: every door lets everyone in (loopback only, which config enforces).
    pub fn is_empty(&self) -> bool {
        self.tags.is_empty()
    }

    /// Whether `name` and `password` are those of a configured user.
    pub fn is_user(&self, name: &str, password: &str) -> bool {
        self.matches(pair(name, password).as_bytes())
    }

    /// HTTP basic auth in `headers` against the configured users; with none, everyone is let in.
    pub fn authorized(&self, headers: &HeaderMap) -> bool {
        if self.is_empty() {
            return true;
        }
        let Some(encoded) = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Basic "))
        else {
            return false;
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
            return false;
        };
        self.matches(&decoded)
    }

    /// The one comparison: constant time per tag, and every tag is visited.
    fn matches(&self, presented: &[u8]) -> bool {
        self.tags.iter().fold(false, |found, tag| {
            found | hmac::verify(&self.key, presented, tag.as_ref()).is_ok()
        })
    }
}

/// `name:password`, as HTTP basic auth sends it.
fn pair(name: &str, password: &str) -> String {
    format!("{name}:{password}")
}

/// The configured users' SCRAM-SHA-256 salted passwords, computed once at start, for the
/// PostgreSQL protocol.
pub struct ScramUsers {
    /// (salt, salted password) by user name.
    by_name: HashMap<String, (Vec<u8>, Vec<u8>)>,
}

impl Debug for ScramUsers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramUsers")
            .field("names", &self.by_name.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl ScramUsers {
    pub fn new(users: &[QueryUser]) -> ScramUsers {
        let by_name = users
            .iter()
            .map(|user| {
                let salt: [u8; 16] = rand_salt();
                let salted = gen_salted_password(&user.password, &salt, SCRAM_ITERATIONS);
                (user.name.clone(), (salt.to_vec(), salted))
            })
            .collect();
        ScramUsers { by_name }
    }

    /// No users configured: the PostgreSQL protocol asks for no password.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The salt and salted password of `user`, if configured.
    fn salted(&self, user: &str) -> Option<&(Vec<u8>, Vec<u8>)> {
        self.by_name.get(user)
    }
}

fn rand_salt() -> [u8; 16] {
    let mut salt = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
        .expect("the system random source works");
    salt
}

#[async_trait]
impl AuthSource for ScramUsers {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        let user = login.user().unwrap_or_default();
        match self.salted(user) {
            Some((salt, salted)) => Ok(Password::new(Some(salt.clone()), salted.clone())),
            None => Err(PgWireError::InvalidPassword(user.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn users() -> Vec<QueryUser> {
        vec![
            QueryUser {
                name: "grafana".to_owned(),
                password: "s3cret".to_owned(),
            },
            QueryUser {
                name: "ops".to_owned(),
                password: "other".to_owned(),
            },
        ]
    }

    fn basic(user_and_password: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let encoded = base64::engine::general_purpose::STANDARD.encode(user_and_password);
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {encoded}")).expect("base64 is a header value"),
        );
        headers
    }

    #[test]
    fn the_right_password_is_let_in_and_anything_else_refused() {
        let credentials = Credentials::new(&users());
        assert!(credentials.is_user("grafana", "s3cret"));
        assert!(credentials.is_user("ops", "other"));
        assert!(!credentials.is_user("grafana", "s3cre"), "wrong password");
        assert!(
            !credentials.is_user("grafana", "other"),
            "another user's password"
        );
        assert!(!credentials.is_user("ops", "s3cret"), "wrong user");
        assert!(!credentials.is_user("nobody", "s3cret"), "user absent");
        assert!(!credentials.is_user("", ""), "empty");
    }

    #[test]
    fn basic_auth_is_checked_against_every_user() {
        let credentials = Credentials::new(&users());
        assert!(credentials.authorized(&basic("grafana:s3cret")));
        assert!(credentials.authorized(&basic("ops:other")));
        assert!(!credentials.authorized(&basic("grafana:wrong")));
        assert!(!credentials.authorized(&basic("nobody:s3cret")));
        assert!(!credentials.authorized(&HeaderMap::new()), "no header");
        let mut garbage = HeaderMap::new();
        garbage.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic !!not base64!!"),
        );
        assert!(!credentials.authorized(&garbage), "not base64");
        let mut bearer = HeaderMap::new();
        bearer.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        assert!(!credentials.authorized(&bearer), "another scheme");
    }

    #[test]
    fn without_users_no_credentials_are_asked_and_none_match() {
        let credentials = Credentials::new(&[]);
        assert!(credentials.is_empty());
        assert!(credentials.authorized(&HeaderMap::new()));
        assert!(!credentials.is_user("grafana", "s3cret"));
    }

    #[test]
    fn scram_users_hold_the_salted_password_of_each_user_only() {
        let scram = ScramUsers::new(&users());
        assert!(!scram.is_empty());
        let (salt, salted) = scram.salted("grafana").expect("grafana is configured");
        assert_eq!(
            *salted,
            gen_salted_password("s3cret", salt, SCRAM_ITERATIONS)
        );
        assert_ne!(
            *salted,
            gen_salted_password("wrong", salt, SCRAM_ITERATIONS)
        );
        assert!(scram.salted("nobody").is_none(), "user absent");
        assert!(ScramUsers::new(&[]).is_empty());
    }
}
