//! The `agents` table: every agent that ever stored a batch (from the WAL's high-water marks) or
//! that the fleet knows (it connected once), joined with what its open connection reports now
//! (from [`ConnectedAgents`]) and what the fleet wants it to run. Built anew at each scan, so it
//! is as fresh as the query. Also the `rollouts` table ([`RolloutsTable`]).

use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use datafusion::arrow::array::{
    ArrayRef, BooleanBuilder, RecordBatch, StringBuilder, TimestampMillisecondBuilder,
    UInt64Builder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::MemTable;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::ExecutionPlan;

use crate::fleet::{AgentInfo, Fleet};
use crate::registry::ConnectedAgents;
use crate::wal::WeakWal;

static AGENTS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let ts = || DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("agent_id", DataType::Utf8, false),
        Field::new("connected", DataType::Boolean, false),
        Field::new("remote", DataType::Utf8, true),
        Field::new("agent_version", DataType::Utf8, true),
        Field::new("connected_since", ts(), true),
        Field::new("last_heartbeat", ts(), true),
        Field::new("buffered_events", DataType::UInt64, true),
        Field::new("buffered_bytes", DataType::UInt64, true),
        // The last sequence number stored for the agent, and when it moved.
        Field::new("last_seq", DataType::UInt64, true),
        Field::new("last_stored", ts(), true),
        Field::new("events_stored_this_connection", DataType::UInt64, true),
        // Fleet: labels as a JSON object, what it runs, what it should run, how it is.
        Field::new("labels", DataType::Utf8, true),
        Field::new("protocol_version", DataType::UInt64, true),
        Field::new("config_hash", DataType::Utf8, true),
        Field::new("config_version", DataType::UInt64, true),
        Field::new("desired_version", DataType::UInt64, true),
        Field::new("last_config_result", DataType::Utf8, true),
        Field::new("healthy", DataType::Boolean, true),
        Field::new("oldest_unshipped_age_ms", DataType::UInt64, true),
        Field::new("dropped_events", DataType::UInt64, true),
        Field::new("last_seen", ts(), true),
    ]))
});

pub struct AgentsTable {
    pub agents: Arc<ConnectedAgents>,
    /// Weak: the table lives as long as the query engine and must not keep the WAL writer up.
    pub wal: WeakWal,
    /// What the fleet knows, when it runs.
    pub fleet: Option<Arc<Fleet>>,
}

impl std::fmt::Debug for AgentsTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentsTable").finish_non_exhaustive()
    }
}

impl AgentsTable {
    async fn batch(&self) -> DfResult<RecordBatch> {
        let wal = self.wal.upgrade().ok_or_else(|| {
            DataFusionError::Execution("the aggregator is shutting down".to_owned())
        })?;
        let stored = wal
            .stored_agents()
            .await
            .map_err(|error| DataFusionError::External(error.into()))?;
        let connected = self.agents.snapshot().agents;
        let fleet: Vec<AgentInfo> = self
            .fleet
            .as_ref()
            .map(|fleet| fleet.agents(None))
            .unwrap_or_default();
        let mut ids: Vec<&str> = stored
            .iter()
            .map(|a| a.agent_id.as_str())
            .chain(fleet.iter().map(|a| a.agent_id.as_str()))
            .chain(connected.iter().map(|c| c.agent_id.as_str()))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let n = ids.len();
        let ts = || TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
        let mut agent_id = StringBuilder::new();
        let mut is_connected = BooleanBuilder::with_capacity(n);
        let mut remote = StringBuilder::new();
        let mut version = StringBuilder::new();
        let mut since = ts();
        let mut heartbeat = ts();
        let mut buffered_events = UInt64Builder::with_capacity(n);
        let mut buffered_bytes = UInt64Builder::with_capacity(n);
        let mut last_seq = UInt64Builder::with_capacity(n);
        let mut last_stored = ts();
        let mut stored_now = UInt64Builder::with_capacity(n);
        let mut labels = StringBuilder::new();
        let mut protocol = UInt64Builder::with_capacity(n);
        let mut config_hash = StringBuilder::new();
        let mut config_version = UInt64Builder::with_capacity(n);
        let mut desired_version = UInt64Builder::with_capacity(n);
        let mut last_result = StringBuilder::new();
        let mut healthy = BooleanBuilder::with_capacity(n);
        let mut oldest = UInt64Builder::with_capacity(n);
        let mut dropped = UInt64Builder::with_capacity(n);
        let mut last_seen = ts();
        for id in ids {
            // An agent may hold two connections for a moment (a reconnect): take the newest.
            let connection = connected
                .iter()
                .filter(|c| c.agent_id == id)
                .max_by_key(|c| c.connected_since_unix_ms);
            let stored = stored.iter().find(|a| a.agent_id == id);
            let info = fleet.iter().find(|a| a.agent_id == id);
            agent_id.append_value(id);
            is_connected.append_value(connection.is_some());
            remote.append_option(connection.map(|c| c.remote.as_str()));
            version.append_option(
                connection
                    .map(|c| c.agent_version.as_str())
                    .or(info.map(|i| i.agent_version.as_str()))
                    .filter(|v| !v.is_empty()),
            );
            since.append_option(connection.map(|c| c.connected_since_unix_ms));
            heartbeat.append_option(connection.and_then(|c| c.last_heartbeat_unix_ms));
            buffered_events.append_option(connection.and_then(|c| c.n_buffered_events));
            buffered_bytes.append_option(connection.and_then(|c| c.buffered_bytes));
            last_seq.append_option(stored.map(|a| a.high_water_mark));
            last_stored.append_option(stored.map(|a| a.updated_unix_ms));
            stored_now.append_option(connection.map(|c| c.n_events_stored));
            let label_map = connection.map(|c| &c.labels).or(info.map(|i| &i.labels));
            labels.append_option(label_map.and_then(|l| serde_json::to_string(l).ok()));
            protocol.append_option(
                connection
                    .map(|c| u64::from(c.protocol_version))
                    .or(info.map(|i| u64::from(i.protocol_version))),
            );
            config_hash.append_option(
                connection
                    .map(|c| c.config_hash.as_str())
                    .or(info.map(|i| i.config_hash.as_str()))
                    .filter(|h| !h.is_empty()),
            );
            config_version.append_option(
                connection
                    .and_then(|c| c.config_version)
                    .or(info.and_then(|i| i.config_version)),
            );
            desired_version.append_option(info.and_then(|i| i.desired_version));
            last_result.append_option(info.and_then(|i| i.last_result.as_deref()));
            healthy.append_option(connection.and_then(|c| c.healthy));
            oldest.append_option(connection.and_then(|c| c.oldest_unshipped_age_ms));
            dropped.append_option(connection.and_then(|c| c.n_dropped_events));
            last_seen.append_option(
                connection
                    .map(|c| {
                        c.last_heartbeat_unix_ms
                            .unwrap_or(c.connected_since_unix_ms)
                    })
                    .or(info.map(|i| i.last_seen_ms).filter(|ms| *ms > 0)),
            );
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(agent_id.finish()),
            Arc::new(is_connected.finish()),
            Arc::new(remote.finish()),
            Arc::new(version.finish()),
            Arc::new(since.finish()),
            Arc::new(heartbeat.finish()),
            Arc::new(buffered_events.finish()),
            Arc::new(buffered_bytes.finish()),
            Arc::new(last_seq.finish()),
            Arc::new(last_stored.finish()),
            Arc::new(stored_now.finish()),
            Arc::new(labels.finish()),
            Arc::new(protocol.finish()),
            Arc::new(config_hash.finish()),
            Arc::new(config_version.finish()),
            Arc::new(desired_version.finish()),
            Arc::new(last_result.finish()),
            Arc::new(healthy.finish()),
            Arc::new(oldest.finish()),
            Arc::new(dropped.finish()),
            Arc::new(last_seen.finish()),
        ];
        Ok(RecordBatch::try_new(AGENTS_SCHEMA.clone(), columns)?)
    }
}

#[async_trait]
impl TableProvider for AgentsTable {
    fn schema(&self) -> SchemaRef {
        AGENTS_SCHEMA.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let batch = self.batch().await?;
        let memory = MemTable::try_new(AGENTS_SCHEMA.clone(), vec![vec![batch]])?;
        memory.scan(state, projection, filters, limit).await
    }
}

static ROLLOUTS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let ts = || DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::UInt64, false),
        Field::new("version", DataType::UInt64, false),
        Field::new("hash", DataType::Utf8, false),
        Field::new("selector", DataType::Utf8, false),
        Field::new("phase", DataType::Utf8, false),
        Field::new("canary", DataType::Utf8, false),
        Field::new("wave", DataType::Utf8, false),
        Field::new("bake_ms", DataType::UInt64, false),
        Field::new("note", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, true),
        Field::new("created", ts(), false),
        Field::new("updated", ts(), false),
        Field::new("n_targets", DataType::UInt64, false),
        Field::new("n_applied", DataType::UInt64, false),
        Field::new("n_failed", DataType::UInt64, false),
        Field::new("n_pending", DataType::UInt64, false),
        Field::new("n_rolled_back", DataType::UInt64, false),
        // JSON arrays: per target (agent_id, group, state, error) and the history lines.
        Field::new("targets", DataType::Utf8, false),
        Field::new("history", DataType::Utf8, false),
    ]))
});

/// The `rollouts` table: every rollout, newest first, from the fleet's state.
pub struct RolloutsTable {
    pub fleet: Arc<Fleet>,
}

impl std::fmt::Debug for RolloutsTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RolloutsTable").finish_non_exhaustive()
    }
}

impl RolloutsTable {
    fn batch(&self) -> DfResult<RecordBatch> {
        let mut rollouts = self.fleet.rollouts();
        rollouts.reverse();
        let n = rollouts.len();
        let ts = || TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
        let mut id = UInt64Builder::with_capacity(n);
        let mut version = UInt64Builder::with_capacity(n);
        let mut hash = StringBuilder::new();
        let mut selector = StringBuilder::new();
        let mut phase = StringBuilder::new();
        let mut canary = StringBuilder::new();
        let mut wave = StringBuilder::new();
        let mut bake = UInt64Builder::with_capacity(n);
        let mut note = StringBuilder::new();
        let mut reason = StringBuilder::new();
        let mut created = ts();
        let mut updated = ts();
        let mut n_targets = UInt64Builder::with_capacity(n);
        let mut n_applied = UInt64Builder::with_capacity(n);
        let mut n_failed = UInt64Builder::with_capacity(n);
        let mut n_pending = UInt64Builder::with_capacity(n);
        let mut n_rolled_back = UInt64Builder::with_capacity(n);
        let mut targets = StringBuilder::new();
        let mut history = StringBuilder::new();
        for rollout in &rollouts {
            let counts = rollout.counts();
            let count = |key: &str| counts.get(key).copied().unwrap_or(0) as u64;
            id.append_value(rollout.id);
            version.append_value(rollout.spec.version);
            hash.append_value(&rollout.spec.hash);
            selector.append_value(&rollout.spec.selector);
            phase.append_value(rollout.phase.as_str());
            canary.append_value(rollout.spec.canary.to_string());
            wave.append_value(rollout.spec.wave.to_string());
            bake.append_value(rollout.spec.bake_ms);
            note.append_value(&rollout.spec.note);
            reason.append_option(rollout.reason.as_deref());
            created.append_value(rollout.created_ms);
            updated.append_value(rollout.updated_ms);
            n_targets.append_value(rollout.targets.len() as u64);
            n_applied.append_value(count("applied"));
            n_failed.append_value(count("failed"));
            n_pending.append_value(count("pushed") + count("waiting"));
            n_rolled_back.append_value(count("rolled_back"));
            targets.append_value(serde_json::to_string(&rollout.targets).unwrap_or_default());
            history.append_value(serde_json::to_string(&rollout.history).unwrap_or_default());
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(id.finish()),
            Arc::new(version.finish()),
            Arc::new(hash.finish()),
            Arc::new(selector.finish()),
            Arc::new(phase.finish()),
            Arc::new(canary.finish()),
            Arc::new(wave.finish()),
            Arc::new(bake.finish()),
            Arc::new(note.finish()),
            Arc::new(reason.finish()),
            Arc::new(created.finish()),
            Arc::new(updated.finish()),
            Arc::new(n_targets.finish()),
            Arc::new(n_applied.finish()),
            Arc::new(n_failed.finish()),
            Arc::new(n_pending.finish()),
            Arc::new(n_rolled_back.finish()),
            Arc::new(targets.finish()),
            Arc::new(history.finish()),
        ];
        Ok(RecordBatch::try_new(ROLLOUTS_SCHEMA.clone(), columns)?)
    }
}

#[async_trait]
impl TableProvider for RolloutsTable {
    fn schema(&self) -> SchemaRef {
        ROLLOUTS_SCHEMA.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let batch = self.batch()?;
        let memory = MemTable::try_new(ROLLOUTS_SCHEMA.clone(), vec![vec![batch]])?;
        memory.scan(state, projection, filters, limit).await
    }
}
