//! Applies managed configs pushed by the aggregator, atomically, and keeps the last good one.
//!
//! An apply checks the pushed files (count, sizes, SHA-256), writes them under
//! `data_dir/managed/<version>-<hash>/`, lays the document over the bootstrap file and validates
//! the result (`runnel_config::managed`), saves window state, builds the new pipeline (models
//! load, rules compile), starts changed sources before it stops the old ones (through
//! [`crate::sources::Sources`], which owns their lifecycle), saves the config
//! as `data_dir/managed/last-good.toml` (temp file, fsync, rename), and only then swaps the
//! pipeline and the buffer policy. Any failure before the swap leaves everything running as it
//! was and is reported as `Failed` with the error.
//!
//! It never touches the buffer's contents or the uplink: events already accepted, buffered or in
//! flight are the same before and after an apply. Sources that did not change keep running.
//!
//! Architecture invariant: one apply at a time (a lock), and the running state changes only in
//! the last step of a successful apply.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use runnel_common::limits::{MAX_CONFIG_FILE_BYTES, MAX_CONFIG_FILES, MAX_CONFIG_PUSH_BYTES};
use runnel_common::wire::{ConfigOutcome, ConfigPush, ConfigResult};
use runnel_config::AgentConfig;
use runnel_config::managed::{self, Bootstrap, ManagedDocument};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::buffer::{Buffer, Policy};
use crate::pipeline::{BuildContext, Pipeline, PipelineHandle};
use crate::sources::{SourceDeps, Sources};

/// Directory under `data_dir` for managed configs.
pub const MANAGED_DIR: &str = "managed";
/// The last applied managed document, under [`MANAGED_DIR`].
pub const LAST_GOOD_FILE: &str = "last-good.toml";
/// First line of [`LAST_GOOD_FILE`]: a TOML comment that carries what the document needs
/// besides its text, as JSON. One file, so that replacing it is one atomic rename.
const LAST_GOOD_HEADER: &str = "# runnel-agent last good managed config: ";

/// What the agent runs now; published after every successful apply.
#[derive(Debug, Clone)]
pub struct Current {
    /// Managed document version (0: bootstrap only).
    pub version: u64,
    /// Hash of the managed document as pushed ("" when bootstrap only).
    pub document_hash: String,
    /// Hash of the effective config (bootstrap merged with the document, plus file hashes).
    pub hash: String,
    pub config: AgentConfig,
    /// Where the document's files are (none when bootstrap only).
    pub files_dir: Option<PathBuf>,
}

/// What [`LAST_GOOD_FILE`]'s header records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct LastGoodHeader {
    version: u64,
    document_hash: String,
    /// Directory name under [`MANAGED_DIR`] that holds the files.
    files_dir: String,
    /// File name -> SHA-256 hex.
    files: BTreeMap<String, String>,
}

/// The effective config to start with: the last good managed config if there is one and it
/// still validates over the bootstrap file, else the bootstrap file alone (logged loudly: the
/// agent then runs without the config its aggregator last gave it, until the next push).
pub fn startup_config(bootstrap: &Bootstrap) -> Current {
    let data_dir = &bootstrap.config().data_dir;
    let managed_dir = data_dir.join(MANAGED_DIR);
    match load_last_good(bootstrap, data_dir) {
        Ok(Some(current)) => {
            tracing::info!(
                version = current.version,
                hash = %current.hash,
                "starting with the last good managed config"
            );
            remove_leftovers(&managed_dir, current.files_dir.as_deref(), false);
            current
        }
        Ok(None) => {
            remove_leftovers(&managed_dir, None, false);
            bootstrap_only(bootstrap)
        }
        Err(error) => {
            // Its files stay: fixing the bootstrap file may make it valid again.
            remove_leftovers(&managed_dir, None, true);
            tracing::error!(
                error = format!("{error:#}"),
                path = %data_dir.join(MANAGED_DIR).join(LAST_GOOD_FILE).display(),
                "THE LAST GOOD MANAGED CONFIG NO LONGER VALIDATES: starting with the bootstrap \
                 file alone until the aggregator pushes a config again"
            );
            bootstrap_only(bootstrap)
        }
    }
}

/// The bootstrap file alone, as what runs.
pub fn startup_bootstrap_only(bootstrap: &Bootstrap) -> Current {
    bootstrap_only(bootstrap)
}

/// Removes what an apply interrupted by a crash or power loss left in `managed_dir`: temporary
/// directories and files, and file directories no last-good config refers to (all but `keep`,
/// unless `keep_file_dirs`).
fn remove_leftovers(managed_dir: &Path, keep: Option<&Path>, keep_file_dirs: bool) {
    let Ok(entries) = std::fs::read_dir(managed_dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        let name = entry.file_name();
        let temporary = name.to_string_lossy().starts_with('.');
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        let remove = temporary || (is_dir && !keep_file_dirs && Some(path.as_path()) != keep);
        if !remove {
            continue;
        }
        let result = if is_dir {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match result {
            Ok(()) => {
                tracing::info!(path = %path.display(), "removed a leftover of an interrupted apply")
            }
            Err(error) => {
                tracing::warn!(%error, path = %path.display(), "remove a leftover of an interrupted apply")
            }
        }
    }
}

fn bootstrap_only(bootstrap: &Bootstrap) -> Current {
    let effective = bootstrap.effective();
    Current {
        version: 0,
        document_hash: String::new(),
        hash: effective.hash,
        config: effective.config,
        files_dir: None,
    }
}

/// The last good managed config over `bootstrap`, if `data_dir` has one; an error when it no
/// longer validates (a file missing or damaged, or the bootstrap file changed under it).
pub fn load_last_good(bootstrap: &Bootstrap, data_dir: &Path) -> anyhow::Result<Option<Current>> {
    let path = data_dir.join(MANAGED_DIR).join(LAST_GOOD_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error).with_context(|| format!("read {}", path.display())),
    };
    let header = text
        .lines()
        .next()
        .and_then(|line| line.strip_prefix(LAST_GOOD_HEADER))
        .with_context(|| format!("{}: no header line", path.display()))?;
    let header: LastGoodHeader = serde_json::from_str(header)
        .with_context(|| format!("{}: header is not valid", path.display()))?;
    let files_dir = data_dir.join(MANAGED_DIR).join(&header.files_dir);
    for (name, sha256) in &header.files {
        let file = files_dir.join(name);
        let content = std::fs::read(&file).with_context(|| format!("read {}", file.display()))?;
        anyhow::ensure!(
            managed::sha256_hex(&content) == *sha256,
            "{}: content does not match its SHA-256 {sha256}",
            file.display()
        );
    }
    let document = ManagedDocument::parse(&text, &path)?;
    let effective = managed::merge(bootstrap, &document, &files_dir, &header.files)?;
    Ok(Some(Current {
        version: header.version,
        document_hash: header.document_hash,
        hash: effective.hash,
        config: effective.config,
        files_dir: Some(files_dir),
    }))
}

/// The agent's config control: applies pushes, publishes what runs.
pub struct Control {
    /// `None` when the agent was started from a config without its file ([`crate::run`]):
    /// pushes then fail.
    bootstrap: Option<Bootstrap>,
    context: BuildContext,
    pipeline: PipelineHandle,
    buffer: Buffer,
    block_timeout_ms: Arc<AtomicU64>,
    deps: SourceDeps,
    current: watch::Sender<Arc<Current>>,
    /// Held for a whole apply; holds the running managed sources.
    sources: tokio::sync::Mutex<Option<Sources>>,
    /// The MQTT listener's address as of the last change, readable without waiting for an apply.
    listener_addr: std::sync::Mutex<Option<SocketAddr>>,
    /// The HTTP address for the runtime file, rewritten when the MQTT listener moves.
    http_addr: std::sync::OnceLock<SocketAddr>,
}

/// What [`Control::new`] needs.
pub struct ControlParts {
    pub bootstrap: Bootstrap,
    pub current: Current,
    pub context: BuildContext,
    pub pipeline: PipelineHandle,
    pub buffer: Buffer,
    /// Shared with the HTTP source.
    pub block_timeout_ms: Arc<AtomicU64>,
    pub deps: SourceDeps,
    pub sources: Sources,
}

impl Control {
    pub fn new(parts: ControlParts) -> Control {
        let (current, _) = watch::channel(Arc::new(parts.current));
        Control {
            bootstrap: Some(parts.bootstrap),
            context: parts.context,
            pipeline: parts.pipeline,
            buffer: parts.buffer,
            block_timeout_ms: parts.block_timeout_ms,
            deps: parts.deps,
            current,
            listener_addr: std::sync::Mutex::new(parts.sources.mqtt_listener_addr()),
            sources: tokio::sync::Mutex::new(Some(parts.sources)),
            http_addr: std::sync::OnceLock::new(),
        }
    }

    /// A control that refuses every push: the agent runs `config` as given.
    pub fn unmanaged(config: AgentConfig, deps: SourceDeps, sources: Sources) -> Control {
        let (current, _) = watch::channel(Arc::new(Current {
            version: 0,
            document_hash: String::new(),
            hash: String::new(),
            files_dir: None,
            config: config.clone(),
        }));
        Control {
            bootstrap: None,
            context: BuildContext {
                data_dir: config.data_dir.clone(),
                agent_id: deps.agent_id.clone(),
            },
            pipeline: deps.pipeline.clone(),
            buffer: deps.buffer.clone(),
            block_timeout_ms: Arc::new(AtomicU64::new(config.buffer.block_timeout_ms)),
            deps,
            current,
            listener_addr: std::sync::Mutex::new(sources.mqtt_listener_addr()),
            sources: tokio::sync::Mutex::new(Some(sources)),
            http_addr: std::sync::OnceLock::new(),
        }
    }

    /// Connection state of the MQTT subscribers.
    pub fn source_health(&self) -> &crate::sources::mqtt_subscriber::SourceHealth {
        &self.deps.health
    }

    /// What runs now.
    pub fn current(&self) -> Arc<Current> {
        Arc::clone(&self.current.borrow())
    }

    /// Changes of [`Control::current`].
    pub fn subscribe(&self) -> watch::Receiver<Arc<Current>> {
        self.current.subscribe()
    }

    /// The MQTT listener's address now (it may move with an apply).
    pub async fn mqtt_listener_addr(&self) -> Option<SocketAddr> {
        self.sources
            .lock()
            .await
            .as_ref()
            .and_then(Sources::mqtt_listener_addr)
    }

    /// The MQTT listener's address after the last apply, without waiting for one in progress.
    pub fn mqtt_listener_addr_now(&self) -> Option<SocketAddr> {
        *self
            .listener_addr
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// From now on, rewrite the runtime file (`data_dir/agent.runtime.json`) when the MQTT
    /// listener moves.
    pub fn keep_runtime_file(&self, http_addr: SocketAddr) {
        let _ = self.http_addr.set(http_addr);
    }

    fn publish_listener(&self, addr: Option<SocketAddr>) {
        *self
            .listener_addr
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = addr;
        if let Some(http) = self.http_addr.get()
            && let Err(error) = crate::write_runtime_file(
                &self.context.data_dir,
                *http,
                addr,
                &self.context.agent_id,
            )
        {
            tracing::warn!(error = format!("{error:#}"), "rewrite the runtime file");
        }
    }

    /// Waits for the sources to end, after the agent's shutdown began.
    pub async fn join_sources(&self) {
        let sources = self.sources.lock().await.take();
        if let Some(sources) = sources {
            sources.join().await;
        }
    }

    /// Applies `push` and says how it went; on failure the agent runs exactly as before.
    pub async fn apply(&self, push: ConfigPush) -> ConfigResult {
        let (version, hash) = (push.version, push.hash.clone());
        let outcome = match self.try_apply(push).await {
            Ok(()) => {
                tracing::info!(version, hash = %self.current().hash, "managed config applied");
                ConfigOutcome::Applied
            }
            Err(error) => {
                let error = format!("{error:#}");
                tracing::warn!(version, %error, "managed config not applied; the previous one keeps running");
                ConfigOutcome::Failed { error }
            }
        };
        ConfigResult {
            version,
            hash,
            outcome,
        }
    }

    async fn try_apply(&self, push: ConfigPush) -> anyhow::Result<()> {
        let Some(bootstrap) = &self.bootstrap else {
            anyhow::bail!(
                "this agent was started without a bootstrap file and takes no managed config"
            );
        };
        let mut sources_slot = self.sources.lock().await;
        let current = self.current();
        if current.version == push.version && current.document_hash == push.hash {
            // A repeat (the aggregator resends after a reconnect): already running.
            return Ok(());
        }
        let files = check_files(&push)?;
        let origin = PathBuf::from(format!("managed config v{}", push.version));
        let document = ManagedDocument::parse(&push.document, &origin)?;
        let data_dir = bootstrap.config().data_dir.clone();
        let managed_dir = data_dir.join(MANAGED_DIR);
        let dir_name = format!(
            "{}-{}",
            push.version,
            &managed::sha256_hex(push.hash.as_bytes())[..12]
        );
        let files_dir = managed_dir.join(&dir_name);
        let effective = managed::merge(bootstrap, &document, &files_dir, &files)?;

        // Files to disk, then build: models load from there.
        let header = LastGoodHeader {
            version: push.version,
            document_hash: push.hash.clone(),
            files_dir: dir_name,
            files,
        };
        {
            let push = push.clone();
            let files_dir = files_dir.clone();
            tokio::task::spawn_blocking(move || write_files(&files_dir, &push))
                .await
                .context("file writer task")??;
        }
        let result = self
            .build_and_swap(&mut sources_slot, &current, effective, header, &push)
            .await;
        if result.is_err() && current.files_dir.as_deref() != Some(files_dir.as_path()) {
            // Nothing refers to the new files.
            let _ = std::fs::remove_dir_all(&files_dir);
        }
        result
    }

    async fn build_and_swap(
        &self,
        sources_slot: &mut Option<Sources>,
        current: &Current,
        effective: managed::Effective,
        header: LastGoodHeader,
        push: &ConfigPush,
    ) -> anyhow::Result<()> {
        let config = effective.config;
        // Window state first, so the new pipeline restores what the old one counted.
        let old = self.pipeline.current();
        tokio::task::spawn_blocking(move || old.persist())
            .await
            .context("save window state task")?
            .context("save window state before the swap")?;
        let pipeline = {
            let config = config.clone();
            let context = self.context.clone();
            tokio::task::spawn_blocking(move || Pipeline::build(&config, &context))
                .await
                .context("pipeline build task")?
                .context("build the pipeline (rules, windows, models)")?
        };

        // Changed sources: the new ones start first; one that cannot start fails the apply
        // while the old ones keep running.
        let Some(sources) = sources_slot.as_mut() else {
            anyhow::bail!("the agent is shutting down");
        };
        let publish = |addr| self.publish_listener(addr);
        let staged = sources
            .stage(&config, &current.config, &self.deps, &publish)
            .await?;

        // The buffer policy before the last-good file: it can fail (an index to build), and a
        // saved config must be one that runs.
        let policy = |config: &AgentConfig| Policy {
            when_full: config.buffer.when_full,
            stream_priorities: config.buffer.stream_priorities.clone(),
        };
        let policy_changed = policy(&config) != policy(&current.config);
        let mut saved = Ok(());
        if policy_changed {
            saved = self
                .buffer
                .set_policy(policy(&config))
                .await
                .context("change the buffer policy");
        }
        if saved.is_ok() {
            saved = save_last_good(&self.context.data_dir, &header, push).await;
            if saved.is_err()
                && policy_changed
                && let Err(error) = self.buffer.set_policy(policy(&current.config)).await
            {
                tracing::error!(error = format!("{error:#}"), "buffer policy not restored");
            }
        }
        if let Err(error) = saved {
            sources
                .abandon(staged, &current.config, &self.deps, &publish)
                .await;
            return Err(error);
        }

        // The swap. Batches already on the old pipeline finish there.
        self.pipeline.replace(pipeline);
        self.block_timeout_ms
            .store(config.buffer.block_timeout_ms, Ordering::Relaxed);
        sources.commit(staged, &config, &self.deps, &publish).await;
        let old_dir = current.files_dir.clone();
        let files_dir = self
            .context
            .data_dir
            .join(MANAGED_DIR)
            .join(&header.files_dir);
        self.current.send_replace(Arc::new(Current {
            version: header.version,
            document_hash: header.document_hash,
            hash: effective.hash,
            config,
            files_dir: Some(files_dir.clone()),
        }));
        if let Some(old_dir) = old_dir
            && old_dir != files_dir
            && let Err(error) = std::fs::remove_dir_all(&old_dir)
        {
            tracing::warn!(%error, dir = %old_dir.display(), "remove the previous config's files");
        }
        Ok(())
    }
}

/// Checks count, sizes and hashes of the pushed files; returns name -> SHA-256.
fn check_files(push: &ConfigPush) -> anyhow::Result<BTreeMap<String, String>> {
    anyhow::ensure!(
        push.files.len() <= MAX_CONFIG_FILES,
        "the config carries {} files; at most {MAX_CONFIG_FILES} are allowed",
        push.files.len()
    );
    let mut n_bytes = push.document.len();
    let mut files = BTreeMap::new();
    for file in &push.files {
        anyhow::ensure!(
            managed::is_file_name(&file.name),
            "file {:?}: not a bare file name",
            file.name
        );
        anyhow::ensure!(
            file.content.len() <= MAX_CONFIG_FILE_BYTES,
            "file {}: {} bytes; at most {MAX_CONFIG_FILE_BYTES} are allowed per file",
            file.name,
            file.content.len()
        );
        n_bytes += file.content.len();
        let actual = managed::sha256_hex(&file.content);
        anyhow::ensure!(
            actual == file.sha256.to_ascii_lowercase(),
            "file {}: SHA-256 is {actual}, the config says {}",
            file.name,
            file.sha256
        );
        anyhow::ensure!(
            files.insert(file.name.clone(), actual).is_none(),
            "file {} is sent twice",
            file.name
        );
    }
    anyhow::ensure!(
        n_bytes <= MAX_CONFIG_PUSH_BYTES,
        "the config and its files are {n_bytes} bytes; at most {MAX_CONFIG_PUSH_BYTES} are allowed"
    );
    Ok(files)
}

/// Writes the push's files into `dir` (a fresh temporary directory renamed into place, so a
/// half-written directory is never used).
fn write_files(dir: &Path, push: &ConfigPush) -> anyhow::Result<()> {
    let parent = dir.parent().context("files directory has a parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    let tmp = parent.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        dir.file_name().and_then(|n| n.to_str()).unwrap_or("files")
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    for file in &push.files {
        let path = tmp.join(&file.name);
        write_synced(&path, &file.content)?;
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("replace {}", dir.display()))?;
    }
    std::fs::rename(&tmp, dir)
        .with_context(|| format!("rename {} to {}", tmp.display(), dir.display()))?;
    sync_dir(parent);
    Ok(())
}

fn write_synced(path: &Path, content: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut file =
        std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    file.write_all(content)
        .with_context(|| format!("write {}", path.display()))?;
    file.sync_all()
        .with_context(|| format!("sync {}", path.display()))
}

/// Best effort: makes a rename in `dir` durable.
fn sync_dir(dir: &Path) {
    if let Ok(dir) = std::fs::File::open(dir) {
        let _ = dir.sync_all();
    }
}

async fn save_last_good(
    data_dir: &Path,
    header: &LastGoodHeader,
    push: &ConfigPush,
) -> anyhow::Result<()> {
    let dir = data_dir.join(MANAGED_DIR);
    let header = serde_json::to_string(header).context("encode last-good header")?;
    let text = format!("{LAST_GOOD_HEADER}{header}\n{}", push.document);
    tokio::task::spawn_blocking(move || {
        let path = dir.join(LAST_GOOD_FILE);
        let tmp = dir.join(format!(".{LAST_GOOD_FILE}.tmp"));
        write_synced(&tmp, text.as_bytes())?;
        std::fs::rename(&tmp, &path)
            .with_context(|| format!("rename {} to {}", tmp.display(), path.display()))?;
        sync_dir(&dir);
        anyhow::Ok(())
    })
    .await
    .context("last-good writer task")?
    .context("save the last good config")
}

#[cfg(test)]
mod tests {
    use runnel_common::wire::ConfigFile;

    use super::*;

    struct Agent {
        _dir: tempfile::TempDir,
        data_dir: PathBuf,
        bootstrap: Bootstrap,
        control: Control,
        pipeline: PipelineHandle,
        _shutdown: watch::Sender<bool>,
    }

    fn bootstrap_text(data_dir: &Path) -> String {
        format!(
            r#"
[agent]
data_dir = "{}"

[sources.http]
listen = "127.0.0.1:0"

[buffer]
max_bytes = 10485760
synchronous = "off"

[uplink]
aggregator = "127.0.0.1:9"
ca_cert = "ca.pem"
cert = "agent.pem"
key = "agent.key"
"#,
            data_dir.display()
        )
    }

    /// An agent's control as `run_bootstrap` builds it, without HTTP or uplink.
    async fn start(dir: tempfile::TempDir) -> Agent {
        let data_dir = dir.path().join("data");
        std::fs::create_dir_all(&data_dir).unwrap();
        let origin = dir.path().join("agent.toml");
        let bootstrap = Bootstrap::parse(&bootstrap_text(&data_dir), &origin).unwrap();
        let current = startup_config(&bootstrap);
        let context = BuildContext {
            data_dir: data_dir.clone(),
            agent_id: "agent-1".into(),
        };
        let pipeline = PipelineHandle::new(Pipeline::build(&current.config, &context).unwrap());
        let (buffer, _thread) = Buffer::open(&current.config.buffer).unwrap();
        let (shutdown_tx, shutdown) = watch::channel(false);
        let deps = SourceDeps {
            agent_id: "agent-1".into(),
            buffer: buffer.clone(),
            pipeline: pipeline.clone(),
            shutdown,
            health: Default::default(),
        };
        let sources = Sources::start(&current.config, &deps).await.unwrap();
        let control = Control::new(ControlParts {
            bootstrap: bootstrap.clone(),
            current,
            context,
            pipeline: pipeline.clone(),
            buffer,
            block_timeout_ms: Arc::new(AtomicU64::new(0)),
            deps,
            sources,
        });
        Agent {
            _dir: dir,
            data_dir,
            bootstrap,
            control,
            pipeline,
            _shutdown: shutdown_tx,
        }
    }

    fn push(version: u64, document: &str, files: Vec<ConfigFile>) -> ConfigPush {
        let hashes = files
            .iter()
            .map(|f| (f.name.clone(), f.sha256.clone()))
            .collect();
        ConfigPush {
            version,
            hash: managed::document_hash(document, &hashes),
            document: document.to_owned(),
            files,
        }
    }

    fn file(name: &str, content: &[u8]) -> ConfigFile {
        ConfigFile {
            name: name.into(),
            sha256: managed::sha256_hex(content),
            content: content.to_vec(),
        }
    }

    fn error_of(result: &ConfigResult) -> &str {
        match &result.outcome {
            ConfigOutcome::Failed { error } => error,
            ConfigOutcome::Applied => panic!("applied, expected a failure"),
        }
    }

    const GOOD: &str = "rules = []\n\n[buffer]\nwhen_full = \"drop_newest\"\nblock_timeout_ms = 250\n\n\
                        [sources.mqtt_listener]\nenabled = true\nlisten = \"127.0.0.1:0\"\n";

    #[tokio::test]
    async fn good_push_swaps_the_pipeline_saves_last_good_and_survives_a_restart() {
        let agent = start(tempfile::tempdir().unwrap()).await;
        let before = agent.control.current();
        let pipeline_before = agent.pipeline.current();
        assert_eq!(before.version, 0);
        assert_eq!(agent.control.mqtt_listener_addr().await, None);

        let pushed = push(1, GOOD, Vec::new());
        let result = agent.control.apply(pushed.clone()).await;
        assert_eq!(result.outcome, ConfigOutcome::Applied, "{result:?}");
        assert_eq!((result.version, &result.hash), (1, &pushed.hash));
        let after = agent.control.current();
        assert_eq!(after.version, 1);
        assert_ne!(after.hash, before.hash);
        assert_eq!(
            after.config.buffer.when_full,
            runnel_config::WhenFull::DropNewest
        );
        assert_eq!(agent.control.block_timeout_ms.load(Ordering::Relaxed), 250);
        assert!(
            !Arc::ptr_eq(&pipeline_before, &agent.pipeline.current()),
            "the pipeline was swapped"
        );
        let addr = agent
            .control
            .mqtt_listener_addr()
            .await
            .expect("the pushed MQTT listener runs");
        tokio::net::TcpStream::connect(addr)
            .await
            .expect("the MQTT listener accepts connections");
        let last_good =
            std::fs::read_to_string(agent.data_dir.join(MANAGED_DIR).join(LAST_GOOD_FILE)).unwrap();
        assert!(last_good.ends_with(GOOD), "{last_good}");

        // The same push again (a reconnect) changes nothing and is applied.
        let again = agent.control.apply(pushed).await;
        assert_eq!(again.outcome, ConfigOutcome::Applied);
        assert_eq!(agent.control.current().hash, after.hash);

        // A restarted agent starts with the pushed config, and clears what a crash in the middle
        // of a later apply left behind.
        let managed_dir = agent.data_dir.join(MANAGED_DIR);
        std::fs::create_dir_all(managed_dir.join(".tmp-1-2-abc")).unwrap();
        std::fs::create_dir_all(managed_dir.join("2-abc")).unwrap();
        let restarted = startup_config(&agent.bootstrap);
        assert!(!managed_dir.join(".tmp-1-2-abc").exists());
        assert!(!managed_dir.join("2-abc").exists());
        assert!(managed_dir.join(LAST_GOOD_FILE).exists());
        assert_eq!(restarted.version, 1);
        assert_eq!(restarted.hash, after.hash);
        assert_eq!(
            restarted.config.buffer.when_full,
            runnel_config::WhenFull::DropNewest
        );
    }

    /// Asserts the agent still runs exactly what it ran before a failed push.
    async fn assert_unchanged(agent: &Agent, before: &Current, pipeline_before: &Arc<Pipeline>) {
        let now = agent.control.current();
        assert_eq!((now.version, &now.hash), (before.version, &before.hash));
        assert!(Arc::ptr_eq(pipeline_before, &agent.pipeline.current()));
        assert!(
            !agent
                .data_dir
                .join(MANAGED_DIR)
                .join(LAST_GOOD_FILE)
                .exists(),
            "no last-good file after a failure"
        );
    }

    #[tokio::test]
    async fn corrupt_or_unloadable_model_fails_and_the_old_config_keeps_running() {
        let agent = start(tempfile::tempdir().unwrap()).await;
        let before = agent.control.current();
        let pipeline_before = agent.pipeline.current();
        let document =
            "[[models]]\nname = \"m\"\npath = \"m.onnx\"\n\n[[models.inputs]]\nfield = \"score\"\n";

        // Damaged in transit: the content does not match its hash.
        let mut damaged = file("m.onnx", b"model bytes");
        damaged.content[0] ^= 1;
        let result = agent.control.apply(push(1, document, vec![damaged])).await;
        assert!(error_of(&result).contains("SHA-256"), "{result:?}");
        assert_unchanged(&agent, &before, &pipeline_before).await;

        // Intact, but not a model: the pipeline build fails.
        let result = agent
            .control
            .apply(push(
                2,
                document,
                vec![file("m.onnx", b"not an onnx model")],
            ))
            .await;
        let error = error_of(&result);
        assert!(error.contains("build the pipeline"), "{error}");
        assert_unchanged(&agent, &before, &pipeline_before).await;

        // Named but not sent.
        let result = agent.control.apply(push(3, document, Vec::new())).await;
        assert!(
            error_of(&result).contains("not sent with the config"),
            "{result:?}"
        );
        assert_unchanged(&agent, &before, &pipeline_before).await;
        // Nothing is left behind in the managed directory but temporary leftovers of nothing.
        let leftovers: Vec<_> = std::fs::read_dir(agent.data_dir.join(MANAGED_DIR))
            .map(|dir| dir.filter_map(Result::ok).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[tokio::test]
    async fn taken_port_fails_and_the_old_config_keeps_running() {
        let agent = start(tempfile::tempdir().unwrap()).await;
        // A first config with a listener, then one that moves it to a port someone else holds.
        let applied = agent.control.apply(push(1, GOOD, Vec::new())).await;
        assert_eq!(applied.outcome, ConfigOutcome::Applied);
        let before = agent.control.current();
        let pipeline_before = agent.pipeline.current();
        let listener_before = agent.control.mqtt_listener_addr().await.unwrap();
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let document = format!(
            "rules = []\n[sources.mqtt_listener]\nenabled = true\nlisten = \"{}\"\n",
            taken.local_addr().unwrap()
        );
        let result = agent.control.apply(push(2, &document, Vec::new())).await;
        let error = error_of(&result);
        assert!(error.contains("sources.mqtt_listener.listen"), "{error}");
        let now = agent.control.current();
        assert_eq!((now.version, &now.hash), (before.version, &before.hash));
        assert!(Arc::ptr_eq(&pipeline_before, &agent.pipeline.current()));
        assert_eq!(
            agent.control.mqtt_listener_addr().await,
            Some(listener_before)
        );
        tokio::net::TcpStream::connect(listener_before)
            .await
            .expect("the old MQTT listener still accepts connections");
        assert_eq!(
            startup_config(&agent.bootstrap).version,
            1,
            "last good is v1"
        );
    }

    #[tokio::test]
    async fn pushed_model_travels_with_the_config_and_scores_events() {
        let agent = start(tempfile::tempdir().unwrap()).await;
        let model = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/fixtures/models/gb_classifier.onnx"),
        )
        .unwrap();
        let mut document =
            "[[models]]\nname = \"fraud\"\npath = \"fraud.onnx\"\nclass = 1\noutput_field = \"score\"\n"
                .to_owned();
        for field in [
            "amount",
            "hour",
            "velocity",
            "account_age_days",
            "card_present",
            "distance_score",
            "items",
            "risk_delta",
        ] {
            document.push_str(&format!("[[models.inputs]]\nfield = \"attrs.{field}\"\n"));
        }
        let result = agent
            .control
            .apply(push(1, &document, vec![file("fraud.onnx", &model)]))
            .await;
        assert_eq!(result.outcome, ConfigOutcome::Applied, "{result:?}");
        let current = agent.control.current();
        let files_dir = current
            .files_dir
            .clone()
            .expect("a managed config has files");
        assert_eq!(std::fs::read(files_dir.join("fraud.onnx")).unwrap(), model);
        assert_eq!(current.config.models[0].path, files_dir.join("fraud.onnx"));

        let mut event = runnel_common::Event::new(runnel_common::SourceKind::Http, "s", "e", 0);
        event
            .attrs
            .insert("amount".into(), runnel_common::Value::Float(120.0));
        let scored = agent.pipeline.process(vec![event]).await;
        assert!(scored[0].score.is_some(), "{scored:?}");

        // Restarted, the agent finds the model where the last good config says.
        let restarted = startup_config(&agent.bootstrap);
        assert_eq!((restarted.version, &restarted.hash), (1, &current.hash));
        assert!(restarted.config.models[0].path.exists());
    }

    /// A loopback port nothing listens on (bound once, then released).
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[tokio::test]
    async fn listener_on_the_same_port_restarts_with_new_settings() {
        let agent = start(tempfile::tempdir().unwrap()).await;
        // A fixed port, so the second config names the same address as the first.
        let port = free_port();
        let listener = |max_connections: u32| {
            format!(
                "[sources.mqtt_listener]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\n\
                 max_connections = {max_connections}\n"
            )
        };
        let first = agent
            .control
            .apply(push(1, &listener(10), Vec::new()))
            .await;
        assert_eq!(first.outcome, ConfigOutcome::Applied, "{first:?}");
        let second = agent
            .control
            .apply(push(2, &listener(20), Vec::new()))
            .await;
        assert_eq!(second.outcome, ConfigOutcome::Applied, "{second:?}");
        let current = agent.control.current();
        assert_eq!(current.config.mqtt_listener.max_connections, 20);
        let addr = agent.control.mqtt_listener_addr().await.unwrap();
        assert_eq!(addr.port(), port);
        tokio::net::TcpStream::connect(addr)
            .await
            .expect("the restarted MQTT listener accepts connections");
    }

    #[tokio::test]
    async fn mqtt_subscribers_are_replaced_and_the_old_ones_stop() {
        let agent = start(tempfile::tempdir().unwrap()).await;
        // A broker that is not there: the subscriber keeps retrying until it is stopped.
        let port = free_port();
        let subscriber = format!(
            "[[sources.mqtt]]\nname = \"plant\"\nurl = \"mqtt://127.0.0.1:{port}\"\n\
             topics = [\"plant/#\"]\n"
        );
        let first = agent.control.apply(push(1, &subscriber, Vec::new())).await;
        assert_eq!(first.outcome, ConfigOutcome::Applied, "{first:?}");
        assert_eq!(agent.control.current().config.mqtt.len(), 1);
        let old_task_count = agent
            .control
            .sources
            .lock()
            .await
            .as_ref()
            .unwrap()
            .n_mqtt_tasks();
        assert_eq!(old_task_count, 1);
        // Removing it waits for the old subscriber to stop; a subscriber that ignored its stop
        // signal would hold the apply past this deadline.
        let second = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            agent
                .control
                .apply(push(2, "sources.mqtt = []\n", Vec::new())),
        )
        .await
        .expect("the old subscriber stops");
        assert_eq!(second.outcome, ConfigOutcome::Applied, "{second:?}");
        assert!(agent.control.current().config.mqtt.is_empty());
        let sources = agent.control.sources.lock().await;
        assert_eq!(sources.as_ref().unwrap().n_mqtt_tasks(), 0);
    }

    #[tokio::test]
    async fn bootstrap_only_keys_are_refused() {
        let agent = start(tempfile::tempdir().unwrap()).await;
        let result = agent
            .control
            .apply(push(
                1,
                "[uplink]\naggregator = \"elsewhere:1\"\n",
                Vec::new(),
            ))
            .await;
        let error = error_of(&result);
        assert!(
            error.starts_with("managed config v1: uplink = ...: is not allowed"),
            "{error}"
        );
        assert_eq!(agent.control.current().version, 0);
    }

    #[tokio::test]
    async fn last_good_that_no_longer_validates_falls_back_to_the_bootstrap_file() {
        let agent = start(tempfile::tempdir().unwrap()).await;
        let applied = agent.control.apply(push(1, GOOD, Vec::new())).await;
        assert_eq!(applied.outcome, ConfigOutcome::Applied);
        let path = agent.data_dir.join(MANAGED_DIR).join(LAST_GOOD_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("drop_newest", "drop_sometimes")).unwrap();
        let restarted = startup_config(&agent.bootstrap);
        assert_eq!(restarted.version, 0);
        assert_eq!(restarted.hash, agent.bootstrap.effective().hash);
    }
}
