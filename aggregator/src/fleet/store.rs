//! Durable fleet state: `fleet.db`, a SQLite file of its own in `aggregator.data_dir`.
//!
//! Not tables in the WAL database: the WAL has one writer thread whose queue is the ingest
//! commit path, and its file holds only what is not flushed to Parquet yet. Fleet writes are
//! rare, small and administrative (a push, a rollout step, an agent's desired version); keeping
//! them in their own file means they never wait behind, or delay, batch commits, and the two
//! schemas evolve separately. Writes happen on the caller's thread under a mutex: each is one
//! short transaction.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use rusqlite::{Connection, OptionalExtension, params};

use super::rollout::Rollout;

pub const FLEET_DB: &str = "fleet.db";

/// A stored config document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    pub version: u64,
    pub hash: String,
    pub note: String,
    pub created_ms: i64,
    pub text: String,
    pub files: Vec<StoredFile>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFile {
    pub name: String,
    pub sha256: String,
    pub content: Vec<u8>,
}

/// What the fleet remembers of an agent between its connections.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct KnownAgent {
    pub labels: BTreeMap<String, String>,
    pub agent_version: String,
    pub protocol_version: u16,
    pub config_hash: String,
    pub config_version: Option<u64>,
    pub last_seen_ms: i64,
    /// The last config result: version, hash, and the error if it failed.
    pub last_result: Option<(u64, String, Option<String>)>,
}

/// The version an agent should run, and the last version it failed to apply (not pushed again
/// until the desired version changes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Desired {
    pub version: u64,
    pub failed_version: Option<u64>,
}

pub struct FleetStore {
    db: std::sync::Mutex<Connection>,
}

impl FleetStore {
    pub fn open(data_dir: &Path) -> anyhow::Result<FleetStore> {
        let path = data_dir.join(FLEET_DB);
        let db = Connection::open(&path).with_context(|| format!("open {}", path.display()))?;
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS documents (
                 version INTEGER PRIMARY KEY, hash TEXT NOT NULL, note TEXT NOT NULL,
                 created_ms INTEGER NOT NULL, text TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS document_files (
                 version INTEGER NOT NULL, name TEXT NOT NULL, sha256 TEXT NOT NULL,
                 content BLOB NOT NULL, PRIMARY KEY (version, name));
             CREATE TABLE IF NOT EXISTS rollouts (id INTEGER PRIMARY KEY, state TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS desired (
                 agent_id TEXT PRIMARY KEY, version INTEGER NOT NULL, failed_version INTEGER);
             CREATE TABLE IF NOT EXISTS agents (agent_id TEXT PRIMARY KEY, state TEXT NOT NULL);",
        )
        .with_context(|| format!("create the fleet tables in {}", path.display()))?;
        Ok(FleetStore {
            db: std::sync::Mutex::new(db),
        })
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stores a new document under the next version and returns it.
    pub fn add_document(
        &self,
        hash: &str,
        note: &str,
        created_ms: i64,
        text: &str,
        files: &[StoredFile],
    ) -> anyhow::Result<u64> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let version: u64 = tx.query_row(
            "SELECT COALESCE(MAX(version), 0) + 1 FROM documents",
            [],
            |row| row.get(0),
        )?;
        tx.execute(
            "INSERT INTO documents (version, hash, note, created_ms, text) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![version, hash, note, created_ms, text],
        )?;
        for file in files {
            tx.execute(
                "INSERT INTO document_files (version, name, sha256, content) VALUES (?1, ?2, ?3, ?4)",
                params![version, file.name, file.sha256, file.content],
            )?;
        }
        tx.commit()?;
        Ok(version)
    }

    pub fn document(&self, version: u64) -> anyhow::Result<Option<Document>> {
        let db = self.db();
        let Some((hash, note, created_ms, text)) = db
            .query_row(
                "SELECT hash, note, created_ms, text FROM documents WHERE version = ?1",
                params![version],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
            )
            .optional()?
        else {
            return Ok(None);
        };
        let mut statement = db.prepare_cached(
            "SELECT name, sha256, content FROM document_files WHERE version = ?1 ORDER BY name",
        )?;
        let files = statement
            .query_map(params![version], |row| {
                Ok(StoredFile {
                    name: row.get(0)?,
                    sha256: row.get(1)?,
                    content: row.get(2)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(Document {
            version,
            hash,
            note,
            created_ms,
            text,
            files,
        }))
    }

    pub fn save_rollout(&self, rollout: &Rollout) -> anyhow::Result<()> {
        let state = serde_json::to_string(rollout).context("encode rollout")?;
        self.db().execute(
            "INSERT INTO rollouts (id, state) VALUES (?1, ?2)
             ON CONFLICT (id) DO UPDATE SET state = excluded.state",
            params![rollout.id, state],
        )?;
        Ok(())
    }

    pub fn rollouts(&self) -> anyhow::Result<Vec<Rollout>> {
        let db = self.db();
        let mut statement = db.prepare("SELECT id, state FROM rollouts ORDER BY id")?;
        let rows = statement
            .query_map([], |row| {
                Ok((row.get::<_, u64>(0)?, row.get::<_, String>(1)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(id, state)| {
                serde_json::from_str(&state).with_context(|| format!("decode rollout {id}"))
            })
            .collect()
    }

    pub fn set_desired(&self, agent_id: &str, desired: Desired) -> anyhow::Result<()> {
        self.db().execute(
            "INSERT INTO desired (agent_id, version, failed_version) VALUES (?1, ?2, ?3)
             ON CONFLICT (agent_id) DO UPDATE SET version = excluded.version,
                 failed_version = excluded.failed_version",
            params![agent_id, desired.version, desired.failed_version],
        )?;
        Ok(())
    }

    pub fn desired(&self) -> anyhow::Result<BTreeMap<String, Desired>> {
        let db = self.db();
        let mut statement = db.prepare("SELECT agent_id, version, failed_version FROM desired")?;
        let rows = statement
            .query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    Desired {
                        version: row.get(1)?,
                        failed_version: row.get(2)?,
                    },
                ))
            })?
            .collect::<Result<BTreeMap<_, _>, _>>()?;
        Ok(rows)
    }

    pub fn save_agent(&self, agent_id: &str, agent: &KnownAgent) -> anyhow::Result<()> {
        let state = serde_json::to_string(agent).context("encode agent")?;
        self.db().execute(
            "INSERT INTO agents (agent_id, state) VALUES (?1, ?2)
             ON CONFLICT (agent_id) DO UPDATE SET state = excluded.state",
            params![agent_id, state],
        )?;
        Ok(())
    }

    pub fn agents(&self) -> anyhow::Result<BTreeMap<String, KnownAgent>> {
        let db = self.db();
        let mut statement = db.prepare("SELECT agent_id, state FROM agents")?;
        let rows = statement
            .query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, state)| Some((id, serde_json::from_str(&state).ok()?)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_desired_and_agents_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = FleetStore::open(dir.path()).expect("open");
            let file = StoredFile {
                name: "m.onnx".into(),
                sha256: "ab".into(),
                content: vec![1, 2, 3],
            };
            assert_eq!(
                store
                    .add_document("h1", "first", 5, "rules = []", &[file])
                    .expect("add"),
                1
            );
            assert_eq!(store.add_document("h2", "", 6, "", &[]).expect("add"), 2);
            store
                .set_desired(
                    "a",
                    Desired {
                        version: 2,
                        failed_version: Some(2),
                    },
                )
                .expect("desired");
            let agent = KnownAgent {
                labels: [("site".to_owned(), "berlin".to_owned())].into(),
                last_seen_ms: 9,
                ..KnownAgent::default()
            };
            store.save_agent("a", &agent).expect("agent");
        }
        let store = FleetStore::open(dir.path()).expect("reopen");
        let doc = store.document(1).expect("read").expect("stored");
        assert_eq!(
            (doc.hash.as_str(), doc.text.as_str(), doc.files.len()),
            ("h1", "rules = []", 1)
        );
        assert_eq!(doc.files[0].content, vec![1, 2, 3]);
        assert!(store.document(3).expect("read").is_none());
        assert_eq!(
            store.desired().expect("desired")["a"].failed_version,
            Some(2)
        );
        assert_eq!(
            store.agents().expect("agents")["a"].labels["site"],
            "berlin"
        );
    }
}
