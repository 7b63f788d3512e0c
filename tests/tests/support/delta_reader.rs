//! The outside reader of the events table, shared by the test files that include it
//! (`#[path = "support/delta_reader.rs"] mod delta_reader;`): `tests/python/read_delta.py` run
//! by the Python that `RUNNEL_TEST_PYTHON` names, one with the PyPI packages `deltalake` and
//! `pyarrow` (`.ci/run` makes such a venv and sets the variable).
//!
//! Without the variable the tests that need the reader say so and skip that part, as the S3
//! tests do without `RUNNEL_TEST_S3_URL`; with a variable that names a Python that cannot import
//! the packages they fail, since the setup is then broken rather than absent.

// Each test file that includes this module uses part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::Context;
use serde_json::Value;

/// Environment variable naming the Python to run the reader with.
pub const PYTHON_ENV: &str = "RUNNEL_TEST_PYTHON";

/// The reader script.
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python/read_delta.py");

/// How to set the reader up, for messages.
pub const SETUP_HINT: &str = "python3 -m venv ~/.cache/runnel-ci/venv && \
     ~/.cache/runnel-ci/venv/bin/pip install 'deltalake>=1.6,<2' pyarrow && \
     export RUNNEL_TEST_PYTHON=~/.cache/runnel-ci/venv/bin/python (.ci/run does this)";

/// A Python that runs the reader.
#[derive(Debug, Clone)]
pub struct Reader {
    python: PathBuf,
}

/// Where the table is: a local directory or `s3://bucket/prefix`, with its storage options.
#[derive(Debug, Clone)]
pub struct Location {
    pub uri: String,
    pub options: Vec<(String, String)>,
}

impl Location {
    pub fn local(dir: &Path) -> Location {
        Location {
            uri: dir.display().to_string(),
            options: Vec::new(),
        }
    }

    /// A table on an S3-compatible test server that takes any credentials (moto).
    pub fn s3(endpoint: &str, bucket_and_prefix: &str) -> Location {
        let options = [
            ("AWS_ENDPOINT_URL", endpoint),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test-secret"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ALLOW_HTTP", "true"),
        ];
        Location {
            uri: format!("s3://{bucket_and_prefix}"),
            options: options
                .iter()
                .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                .collect(),
        }
    }

    fn args(&self) -> Vec<String> {
        let mut args = vec![SCRIPT.to_owned(), self.uri.clone()];
        for (key, value) in &self.options {
            args.push("--option".to_owned());
            args.push(format!("{key}={value}"));
        }
        args
    }
}

/// What the reader saw in one version of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRead {
    pub version: i64,
    pub n_rows: u64,
    /// Distinct (agent_id, seq).
    pub n_distinct: u64,
    /// Up to 5 `[agent_id, seq, count]` that appear more than once.
    pub duplicates: Vec<Value>,
    /// Highest seq of each agent id.
    pub max_seq: BTreeMap<String, i64>,
    /// Version of each transaction identifier (`runnel-agent-<agent id>`); None: absent.
    pub txn: BTreeMap<String, Option<i64>>,
    pub n_files: u64,
}

impl VersionRead {
    fn parse(line: &str) -> anyhow::Result<VersionRead> {
        let value: Value =
            serde_json::from_str(line).with_context(|| format!("reader line {line:?}"))?;
        if let Some(error) = value.get("error") {
            anyhow::bail!("the reader failed at version {}: {error}", value["version"]);
        }
        let int = |key: &str| {
            value[key]
                .as_u64()
                .with_context(|| format!("`{key}` in reader line {line:?}"))
        };
        let max_seq = value["max_seq"]
            .as_object()
            .context("max_seq")?
            .iter()
            .map(|(agent, seq)| Ok((agent.clone(), seq.as_i64().context("max_seq value")?)))
            .collect::<anyhow::Result<_>>()?;
        let txn = value["txn"]
            .as_object()
            .context("txn")?
            .iter()
            .map(|(app, version)| (app.clone(), version.as_i64()))
            .collect();
        Ok(VersionRead {
            version: value["version"]
                .as_i64()
                .with_context(|| format!("`version` in reader line {line:?}"))?,
            n_rows: int("n_rows")?,
            n_distinct: int("n_distinct")?,
            duplicates: value["duplicates"].as_array().cloned().unwrap_or_default(),
            max_seq,
            txn,
            n_files: int("n_files")?,
        })
    }

    /// Every agent's transaction identifier names the highest seq of that agent in this
    /// version (holds while retention has removed none of the newest events).
    pub fn marks_match_rows(&self) -> bool {
        self.max_seq
            .iter()
            .all(|(agent, seq)| self.txn.get(&format!("runnel-agent-{agent}")) == Some(&Some(*seq)))
    }
}

/// The reader, or None (after saying why) when `RUNNEL_TEST_PYTHON` is not set. Panics when it
/// names a Python that cannot run the reader.
pub fn reader(what: &str) -> Option<Reader> {
    let Some(python) = std::env::var_os(PYTHON_ENV) else {
        eprintln!(
            "{PYTHON_ENV} is not set: skipping {what} (it needs a Python with the PyPI packages \
             deltalake and pyarrow; .ci/run sets it up). To run it: {SETUP_HINT}"
        );
        return None;
    };
    let python = PathBuf::from(python);
    let output = Command::new(&python)
        .args([
            "-c",
            "import deltalake, pyarrow; from deltalake import DeltaTable; \
             DeltaTable.transaction_version; print(deltalake.__version__, pyarrow.__version__)",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| {
            panic!("{PYTHON_ENV}={}: cannot run it: {error}", python.display())
        });
    assert!(
        output.status.success(),
        "{PYTHON_ENV}={} cannot import deltalake (with DeltaTable.transaction_version) and \
         pyarrow ({}): {}\nSet it up: {SETUP_HINT}",
        python.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!(
        "outside reader: {} with deltalake and pyarrow {}",
        python.display(),
        String::from_utf8_lossy(&output.stdout).trim()
    );
    Some(Reader { python })
}

impl Reader {
    /// Reads the latest version once.
    pub fn read_once(&self, location: &Location) -> anyhow::Result<VersionRead> {
        let output = Command::new(&self.python)
            .args(location.args())
            .stdin(Stdio::null())
            .output()
            .context("run the reader")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        anyhow::ensure!(
            output.status.success(),
            "the reader of {} exited with {}: {}{}",
            location.uri,
            output.status,
            stdout,
            String::from_utf8_lossy(&output.stderr)
        );
        VersionRead::parse(stdout.trim())
    }

    /// Starts a reader that polls for new versions and writes a line per version it read to
    /// `<out>.stdout` (its stderr to `<out>.stderr`). Killed when the handle drops.
    pub fn watch(&self, location: &Location, out: &Path) -> Watcher {
        let stdout = out.with_extension("stdout");
        let stderr = out.with_extension("stderr");
        let create = |path: &Path| {
            std::fs::File::create(path)
                .unwrap_or_else(|error| panic!("create {}: {error}", path.display()))
        };
        let mut args = location.args();
        args.extend([
            "--watch".to_owned(),
            "--interval".to_owned(),
            "0.05".to_owned(),
        ]);
        let child = Command::new(&self.python)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(create(&stdout))
            .stderr(create(&stderr))
            .spawn()
            .unwrap_or_else(|error| panic!("start the reader: {error}"));
        Watcher {
            child,
            stdout,
            stderr,
        }
    }
}

/// A reader polling the table in the background.
pub struct Watcher {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Watcher {
    /// Every version read so far, in order (complete lines only); an error when the reader
    /// reported a failed read or has exited.
    pub fn reads(&mut self) -> anyhow::Result<Vec<VersionRead>> {
        let text = std::fs::read_to_string(&self.stdout)
            .with_context(|| format!("read {}", self.stdout.display()))?;
        let complete = match text.rfind('\n') {
            Some(end) => &text[..end],
            None => "",
        };
        let reads = complete
            .lines()
            .map(VersionRead::parse)
            .collect::<anyhow::Result<Vec<_>>>()?;
        if let Some(status) = self.child.try_wait().context("check the reader")? {
            anyhow::bail!(
                "the reader exited with {status}; stderr:\n{}",
                std::fs::read_to_string(&self.stderr).unwrap_or_default()
            );
        }
        Ok(reads)
    }

    /// The reader's stderr so far, for failure messages.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
